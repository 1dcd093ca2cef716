//! TLS for client connections (rustls with the *ring* provider).
//!
//! An operator gives `--tls-cert` and `--tls-key` (PEM). Without them, `ternd` creates a
//! self-signed development certificate for `localhost` and `127.0.0.1` on first start,
//! keeps it in `DATA_DIR/tls/`, and says so in the log: clients must pin it explicitly.
//!
//! Only TLS 1.3 is offered unless the operator passes `--tls12`, which adds TLS 1.2 for
//! old clients. The suites are listed explicitly: TLS 1.3's three, and for TLS 1.2 only
//! ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305). rustls implements
//! no CBC, RC4 or static-RSA suite for TLS 1.2 at all, so none could slip in; the list
//! only keeps a future default from widening what is offered.
//!
//! On SIGHUP the runtime calls [`reload_config`]: the same files are read again (the
//! development certificate too, but it is never created then), and a bad new pair is an
//! error the caller logs while it keeps the configuration it had.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring::cipher_suite;
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

/// How the TLS listeners are configured.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// The certificate and key.
    pub source: CertSource,
    /// Whether TLS 1.2 (AEAD suites only) is accepted besides TLS 1.3 (`--tls12`).
    pub allow_tls12: bool,
}

/// File names of the development certificate, under `DATA_DIR/tls/`.
pub const DEV_CERT: &str = "dev-cert.pem";
/// See [`DEV_CERT`].
pub const DEV_KEY: &str = "dev-key.pem";

/// The cipher suites offered: TLS 1.3's, then (used only with `--tls12`) TLS 1.2's
/// ECDHE + AEAD suites, strongest first.
const CIPHER_SUITES: [rustls::SupportedCipherSuite; 9] = [
    cipher_suite::TLS13_AES_256_GCM_SHA384,
    cipher_suite::TLS13_AES_128_GCM_SHA256,
    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// Builds the server's TLS configuration at start-up (creating the development
/// certificate if it is used and missing).
pub fn server_config(settings: &TlsSettings) -> io::Result<Arc<rustls::ServerConfig>> {
    if let CertSource::Development { data_dir } = &settings.source {
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
    }
    reload_config(settings)
}

/// Reads the certificate and key again and builds a configuration from them; creates
/// nothing. An unreadable or mismatched pair is an error (the caller keeps its old one).
pub fn reload_config(settings: &TlsSettings) -> io::Result<Arc<rustls::ServerConfig>> {
    let (cert_path, key_path) = match &settings.source {
        CertSource::Files { cert, key } => (cert.clone(), key.clone()),
        CertSource::Development { data_dir } => {
            let dir = data_dir.join("tls");
            (dir.join(DEV_CERT), dir.join(DEV_KEY))
        }
    };
    let in_file = |path: &Path, error: io::Error| {
        io::Error::new(error.kind(), format!("{}: {error}", path.display()))
    };
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut io::BufReader::new(
        std::fs::File::open(&cert_path).map_err(|e| in_file(&cert_path, e))?,
    ))
    .collect::<Result<_, _>>()
    .map_err(|e| in_file(&cert_path, e))?;
    if certs.is_empty() {
        let why = format!("no certificate in {}", cert_path.display());
        return Err(io::Error::new(io::ErrorKind::InvalidData, why));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut io::BufReader::new(
        std::fs::File::open(&key_path).map_err(|e| in_file(&key_path, e))?,
    ))
    .map_err(|e| in_file(&key_path, e))?
    .ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("no key in {}", key_path.display()))
    })?;
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..rustls::crypto::ring::default_provider()
    };
    let versions: &[&rustls::SupportedProtocolVersion] = if settings.allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    // `with_single_cert` checks that the key matches the certificate: a renewal that
    // swapped only one of the two files is refused here, not at the first handshake.
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
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
