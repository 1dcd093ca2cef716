//! Development certificates for the node mesh: a CA and one certificate per node signed
//! by it, made by `ternctl cluster init`.
//!
//! Node-to-node connections are mutual TLS 1.3, so each node certificate carries both
//! `serverAuth` and `clientAuth`, and names the node id (and the hosts given) as DNS or
//! IP subject alternative names. A production cluster uses the operator's own CA; its
//! files have the same shape (PEM certificate, PEM PKCS#8 key), so a node loads either
//! alike. Keys are written with mode 0600 and nothing is ever overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// A development CA and the certificates of the nodes it signed.
#[derive(Debug, Clone)]
pub struct DevelopmentCerts {
    /// The CA (its key signs more nodes later; keep it off the nodes).
    pub ca: Pair,
    /// Per node id.
    pub nodes: Vec<(String, Pair)>,
}

/// Why certificates could not be made or written.
#[derive(Debug)]
pub enum CertError {
    /// A node id that cannot be a DNS name (letters, digits, `-`; not empty).
    BadNodeId {
        /// The id.
        node: String,
    },
    /// rcgen refused the parameters.
    Generate(String),
    /// A file that would be overwritten: nothing was written.
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Writing failed.
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

impl std::fmt::Display for CertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertError::BadNodeId { node } => {
                write!(f, "node id {node:?} cannot name a certificate: use letters, digits and -")
            }
            CertError::Generate(why) => write!(f, "making a certificate failed: {why}"),
            CertError::Exists { path } => write!(
                f,
                "{} exists: nothing was written (remove it, or choose another directory)",
                path.display()
            ),
            CertError::Io { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for CertError {}

fn generate(error: rcgen::Error) -> CertError {
    CertError::Generate(error.to_string())
}

/// A new CA and a certificate for each of `nodes`, naming the node id and `hosts` (DNS
/// names or IP addresses) as subject alternative names.
pub fn development(nodes: &[String], hosts: &[String]) -> Result<DevelopmentCerts, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, "Tern cluster development CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(generate)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = CertifiedIssuer::self_signed(params, ca_key).map_err(generate)?;
    let ca = Pair { cert_pem: issuer.pem(), key_pem: ca_key_pem };
    let mut signed = Vec::with_capacity(nodes.len());
    for node in nodes {
        let valid = !node.is_empty() && node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !valid {
            return Err(CertError::BadNodeId { node: node.clone() });
        }
        let names: Vec<String> =
            std::iter::once(node.clone()).chain(hosts.iter().cloned()).collect();
        let mut params = CertificateParams::new(names).map_err(generate)?;
        params.distinguished_name.push(DnType::CommonName, node.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(generate)?;
        let cert = params.signed_by(&key, &issuer).map_err(generate)?;
        signed.push((node.clone(), Pair { cert_pem: cert.pem(), key_pem: key.serialize_pem() }));
    }
    Ok(DevelopmentCerts { ca, nodes: signed })
}

/// Writes `ca.pem`, `ca-key.pem`, `<node>.pem` and `<node>-key.pem` into `dir` (created
/// if missing), keys with mode 0600; refuses before writing anything if one exists.
/// Returns the files written.
pub fn write(dir: &Path, certs: &DevelopmentCerts) -> Result<Vec<PathBuf>, CertError> {
    let mut files = vec![(dir.join("ca.pem"), &certs.ca.cert_pem, false)];
    files.push((dir.join("ca-key.pem"), &certs.ca.key_pem, true));
    for (node, pair) in &certs.nodes {
        files.push((dir.join(format!("{node}.pem")), &pair.cert_pem, false));
        files.push((dir.join(format!("{node}-key.pem")), &pair.key_pem, true));
    }
    if let Some((path, _, _)) = files.iter().find(|(path, _, _)| path.exists()) {
        return Err(CertError::Exists { path: path.clone() });
    }
    std::fs::create_dir_all(dir).map_err(|error| CertError::Io { path: dir.into(), error })?;
    for (path, text, secret) in &files {
        write_new(path, text, *secret)
            .map_err(|error| CertError::Io { path: path.clone(), error })?;
    }
    Ok(files.into_iter().map(|(path, _, _)| path).collect())
}

/// Creates `path` (failing if it exists) with `text`, mode 0600 for a secret.
fn write_new(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::RootCertStore;

    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate")
    }

    fn roots(ca: &Pair) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(der(&ca.cert_pem)).expect("the CA is a valid root");
        Arc::new(roots)
    }

    #[test]
    fn node_certificates_chain_to_their_ca_as_server_and_client() {
        let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let certs = development(&["a".into(), "b".into()], &hosts).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let servers = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots(&certs.ca),
            provider.clone(),
        )
        .build()
        .unwrap();
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(&certs.ca),
            provider.clone(),
        )
        .build()
        .unwrap();
        let now = UnixTime::now();
        for (node, pair) in &certs.nodes {
            let cert = der(&pair.cert_pem);
            for name in [node.as_str(), "localhost", "127.0.0.1"] {
                let name = ServerName::try_from(name.to_string()).unwrap();
                servers.verify_server_cert(&cert, &[], &name, &[], now).unwrap();
            }
            clients.verify_client_cert(&cert, &[], now).unwrap();
        }
        // Another node's name, and another CA's certificate, are refused.
        let a = der(&certs.nodes[0].1.cert_pem);
        let b_name = ServerName::try_from("b".to_string()).unwrap();
        assert!(servers.verify_server_cert(&a, &[], &b_name, &[], now).is_err());
        let other = development(&["a".into()], &hosts).unwrap();
        let stranger = der(&other.nodes[0].1.cert_pem);
        assert!(clients.verify_client_cert(&stranger, &[], now).is_err());
    }

    #[test]
    fn files_are_written_once_with_private_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let certs = development(&["n1".into()], &[]).unwrap();
        let written = write(&out, &certs).unwrap();
        assert_eq!(written.len(), 4);
        let mode = |name: &str| std::fs::metadata(out.join(name)).unwrap().permissions().mode();
        assert_eq!(mode("ca-key.pem") & 0o777, 0o600);
        assert_eq!(mode("n1-key.pem") & 0o777, 0o600);
        let before = std::fs::read(out.join("ca.pem")).unwrap();
        let again = development(&["n1".into()], &[]).unwrap();
        match write(&out, &again) {
            Err(CertError::Exists { path }) => assert_eq!(path, out.join("ca.pem")),
            other => panic!("expected Exists, got {other:?}"),
        }
        assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), before, "nothing overwritten");
        assert!(matches!(development(&["bad id".into()], &[]), Err(CertError::BadNodeId { .. })));
    }
}
