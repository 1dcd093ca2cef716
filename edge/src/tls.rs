//! TLS 1.3 for client connections (rustls with the *ring* provider).
//!
//! An operator gives `--tls-cert` and `--tls-key` (PEM). Without them, `ternd` creates a
//! self-signed development certificate for `localhost` and `127.0.0.1` on first start,
//! keeps it in `DATA_DIR/tls/`, and says so in the log: clients must pin it explicitly.
//! Only TLS 1.3 is offered.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where the certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// PEM files given by the operator.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
    /// A development certificate in the data directory, created if missing.
    Development {
        /// The data directory.
        data_dir: PathBuf,
    },
}

/// File names of the development certificate, under `DATA_DIR/tls/`.
pub const DEV_CERT: &str = "dev-cert.pem";
/// See [`DEV_CERT`].
pub const DEV_KEY: &str = "dev-key.pem";

/// Builds the server's TLS configuration.
pub fn server_config(source: &CertSource) -> io::Result<Arc<rustls::ServerConfig>> {
    let (cert_path, key_path) = match source {
        CertSource::Files { cert, key } => (cert.clone(), key.clone()),
        CertSource::Development { data_dir } => {
            let dir = data_dir.join("tls");
            let (cert, key) = (dir.join(DEV_CERT), dir.join(DEV_KEY));
            if !cert.exists() || !key.exists() {
                create_development_cert(&dir, &cert, &key)?;
                tracing::warn!(
                    cert = %cert.display(),
                    "created a self-signed development TLS certificate; clients must pin it \
                     (give --tls-cert and --tls-key for a real one)"
                );
            } else {
                tracing::info!(cert = %cert.display(), "using the development TLS certificate");
            }
            (cert, key)
        }
    };
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut io::BufReader::new(std::fs::File::open(&cert_path)?))
            .collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut io::BufReader::new(std::fs::File::open(&key_path)?))?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("no key in {}", key_path.display()),
                )
            })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Arc::new(config))
}

fn create_development_cert(dir: &Path, cert_path: &Path, key_path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let generated = rcgen::generate_simple_self_signed(names).map_err(io::Error::other)?;
    std::fs::write(cert_path, generated.cert.pem())?;
    // The key is readable by the server's user only.
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(key_path)?;
    key.write_all(generated.signing_key.serialize_pem().as_bytes())?;
    key.sync_all()
}
