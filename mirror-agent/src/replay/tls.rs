//! Mirrors that speak TLS (`--mirror https://…`), with rustls: the server name from the URL
//! (SNI and the certificate check), ALPN `h2` for HTTP/2 requests and `http/1.1` for HTTP/1,
//! the system's roots or `--mirror-ca`, a client certificate for mTLS mirrors, and
//! `--mirror-insecure` for test setups only.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How the agent speaks TLS to https mirrors.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// Trust only these CA certificates (PEM) instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate chain and its key (PEM), for mirrors that ask for one (mTLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Accept any certificate: test setups only.
    pub insecure: bool,
}

/// Why TLS to a mirror cannot be set up. Each names the option to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--mirror-ca {}: {what}", .path.display())]
    Ca { path: PathBuf, what: String },
    #[error("--mirror-cert/--mirror-key {}: {what}", .path.display())]
    ClientCert { path: PathBuf, what: String },
    #[error(
        "no trusted root certificates: the system has none readable ({0}); give --mirror-ca FILE"
    )]
    NoRoots(String),
    #[error("{host:?} is not a name or address a certificate can be checked against")]
    ServerName { host: String },
    #[error("TLS client configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Which protocol a connection carries, told to the mirror by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    Http1,
    H2,
}

/// TLS to one mirror: a client configuration per protocol, and the name its certificate must
/// carry.
#[derive(Clone)]
pub struct MirrorTls {
    http1: TlsConnector,
    h2: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for MirrorTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MirrorTls({:?})", self.name)
    }
}

impl MirrorTls {
    /// TLS to the mirror at `host` (from its URL).
    pub fn new(host: &str, opts: &TlsOptions) -> Result<MirrorTls, TlsError> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName {
            host: host.to_string(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?;
        let builder = if opts.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        } else {
            builder.with_root_certificates(roots(opts.ca.as_ref())?)
        };
        let mut config = match &opts.client_cert {
            Some((cert, key)) => {
                let (chain, key) = client_identity(cert, key)?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        let with_alpn = |config: &mut ClientConfig, proto: &[u8]| {
            config.alpn_protocols = vec![proto.to_vec()];
            TlsConnector::from(Arc::new(config.clone()))
        };
        Ok(MirrorTls {
            http1: with_alpn(&mut config, b"http/1.1"),
            h2: with_alpn(&mut config, b"h2"),
            name,
        })
    }

    /// The TLS handshake over an open connection.
    pub async fn connect(&self, tcp: TcpStream, alpn: Alpn) -> std::io::Result<MirrorStream> {
        let connector = match alpn {
            Alpn::Http1 => &self.http1,
            Alpn::H2 => &self.h2,
        };
        let tls = connector.connect(self.name.clone(), tcp).await?;
        Ok(MirrorStream::Tls(Box::new(tls)))
    }
}

fn roots(ca: Option<&PathBuf>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match ca {
        Some(path) => {
            let bad = |what: String| TlsError::Ca {
                path: path.clone(),
                what,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificate in it".into()));
            }
            for c in certs {
                store.add(c).map_err(|e| bad(e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map_or("none found".to_string(), |e| e.to_string());
                return Err(TlsError::NoRoots(why));
            }
        }
    }
    Ok(store)
}

fn client_identity(
    cert: &PathBuf,
    key: &PathBuf,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let bad = |path: &PathBuf, what: String| TlsError::ClientCert {
        path: path.clone(),
        what,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no PEM certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    Ok((chain, key))
}

/// `--mirror-insecure`: any certificate is accepted, signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection to a mirror, plain or over TLS.
pub enum MirrorStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for MirrorStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MirrorStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MirrorStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MirrorStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MirrorStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MirrorStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MirrorStream::Plain(s) => Pin::new(s).poll_flush(cx),
            MirrorStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MirrorStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MirrorStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MirrorStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MirrorStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MirrorStream::Plain(s) => s.is_write_vectored(),
            MirrorStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_name_the_option() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let opts = TlsOptions {
            ca: Some(empty.clone()),
            ..TlsOptions::default()
        };
        let e = MirrorTls::new("mirror.example", &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--mirror-ca") && e.contains("no PEM certificate"),
            "{e}"
        );
        let opts = TlsOptions {
            insecure: true,
            client_cert: Some((empty.clone(), dir.path().join("missing.key"))),
            ..TlsOptions::default()
        };
        let e = MirrorTls::new("mirror.example", &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--mirror-cert"), "{e}");
        assert!(MirrorTls::new(
            "10.0.0.1",
            &TlsOptions {
                insecure: true,
                ..TlsOptions::default()
            }
        )
        .is_ok());
    }
}
