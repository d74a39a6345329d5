//! TLS to PostgreSQL with libpq's `sslmode` meanings, through rustls (no OpenSSL): what
//! each mode checks of the server's certificate, the warning when nothing is, and a
//! failed connection told in one line that names the host, the mode and the fix.
//!
//! | mode | encrypted | the server's certificate |
//! |---|---|---|
//! | `disable` | never | not asked for |
//! | `prefer` (default) | when the server offers it | not checked (with `sslrootcert`: its chain) |
//! | `require` | always | not checked (with `sslrootcert`: its chain) |
//! | `verify-ca` | always | its chain leads to a root (the system's, or `sslrootcert`'s) |
//! | `verify-full` | always | as `verify-ca`, and it names the host connected to |
//!
//! libpq reads the host's name from the certificate's subject alternative names, and
//! from its common name only when it has none (as Debian's "snakeoil" certificate);
//! webpki reads only the former, so the latter is checked here.

use std::net::IpAddr;
use std::sync::Arc;

use deadpool_postgres::PoolError;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;
use x509_cert::der::Decode;
use x509_cert::der::oid::ObjectIdentifier;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use crate::config::{PostgresConfig, SslMode};
use crate::store::StoreError;

const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
const SUBJECT_ALT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");

/// What is checked of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

/// libpq's rules: the verifying modes check what they say; `prefer` and `require` check
/// the chain when a root certificate is given, nothing otherwise.
fn check_of(pg: &PostgresConfig) -> Check {
    match (pg.ssl_mode, &pg.root_cert) {
        (SslMode::VerifyFull, _) => Check::ChainAndName,
        (SslMode::VerifyCa, _) | (SslMode::Prefer | SslMode::Require, Some(_)) => Check::Chain,
        (SslMode::Disable, _) | (SslMode::Prefer | SslMode::Require, None) => Check::Nothing,
    }
}

/// The TLS connector `pg` asks for.
pub(super) fn connector(pg: &PostgresConfig) -> Result<MakeRustlsConnect, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match check_of(pg) {
        Check::Nothing => Arc::new(AnyCertificate(Arc::clone(&provider))),
        check => Arc::new(Verify {
            webpki: WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(pg)?),
                Arc::clone(&provider),
            )
            .build()
            .map_err(|e| StoreError::Setup(format!("cannot check certificates: {e}")))?,
            name: check == Check::ChainAndName,
        }),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Setup(format!("cannot set up TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// `sslrootcert`'s certificates if given (and only those, as libpq), else the system's.
fn roots(pg: &PostgresConfig) -> Result<RootCertStore, StoreError> {
    let mut roots = RootCertStore::empty();
    match &pg.root_cert {
        Some(path) => {
            let unreadable = |e: &dyn std::fmt::Display| {
                StoreError::Setup(format!(
                    "cannot read the certificates of sslrootcert ({}): {e}",
                    path.display()
                ))
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| unreadable(&e))? {
                roots
                    .add(cert.map_err(|e| unreadable(&e))?)
                    .map_err(|e| unreadable(&e))?;
            }
            if roots.is_empty() {
                return Err(unreadable(&"the file holds no PEM certificate"));
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err(StoreError::Connect {
                    host: pg.hosts(),
                    mode: pg.ssl_mode.as_str(),
                    problem: "this system trusts no CA (none in SSL_CERT_FILE, SSL_CERT_DIR or the system's store); set sslrootcert to the file of the CA that signed the server's certificate, or sslmode=require to encrypt without checking the server's identity".into(),
                });
            }
        }
    }
    Ok(roots)
}

/// Logs, once at start, what `pg` leaves unchecked.
pub(super) fn warn_if_unchecked(pg: &PostgresConfig) {
    let mode = pg.ssl_mode.as_str();
    match (pg.ssl_mode, check_of(pg)) {
        (SslMode::Disable, _) => tracing::warn!(
            sslmode = mode,
            "connections to PostgreSQL are not encrypted: use this only on a network you trust; sslmode=verify-full is for production"
        ),
        (_, Check::Nothing) => tracing::warn!(
            sslmode = mode,
            "the PostgreSQL server's identity is not checked: whoever sits between the router and the database could pose as it; sslmode=verify-full is for production"
        ),
        (_, Check::Chain) => tracing::warn!(
            sslmode = mode,
            "the PostgreSQL server's certificate chain is checked, not the name on it; sslmode=verify-full is for production"
        ),
        (_, Check::ChainAndName) => {}
    }
}

/// A connection that `pg` could not open, in one line: host, mode, what went wrong and
/// what to change.
pub(super) fn connect_error(pg: &PostgresConfig, error: &PoolError) -> StoreError {
    let (host, problem) = match error {
        PoolError::Backend(e) => problem(pg, e),
        PoolError::Timeout(_) => (
            pg.hosts(),
            "no answer within 5 s; check the host, the port and the network".to_owned(),
        ),
        other => (pg.hosts(), crate::net::describe(other)),
    };
    StoreError::Connect {
        host,
        mode: pg.ssl_mode.as_str(),
        problem,
    }
}

/// The host the failure concerns (the one named in a certificate error) and what to say.
fn problem(pg: &PostgresConfig, error: &tokio_postgres::Error) -> (String, String) {
    let hosts = pg.hosts();
    if let Some(db) = error.as_db_error() {
        return (hosts, format!("{}: {}", db.severity(), db.message()));
    }
    let Some(tls) = rustls_error(error) else {
        let text = crate::net::describe(error);
        if text.contains("server does not support TLS") {
            return (
                hosts,
                "the server does not offer TLS; turn ssl on in its postgresql.conf, or (on a network you trust) set sslmode=prefer or disable".into(),
            );
        }
        return (hosts, text);
    };
    let weaker = "or sslmode=require to encrypt without checking the server's identity";
    let said = match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other))) => {
            match other.downcast_ref::<WrongName>() {
                Some(wrong) => {
                    let names = wrong.names.join(", ");
                    return (
                        wrong.host.clone(),
                        format!(
                            "the server's certificate is for {names}, not {host}; connect by a name on the certificate ({names}), have the server's certificate name {host}, or set sslmode=verify-ca to check its chain only",
                            host = wrong.host
                        ),
                    );
                }
                None => format!("the server's certificate was refused ({other})"),
            }
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => match &pg.root_cert {
            Some(root) => format!(
                "the server's certificate does not lead to a certificate in sslrootcert ({}); give the file of the CA that signed it (for a self-signed certificate, the certificate itself), {weaker}",
                root.display()
            ),
            None => format!(
                "the server's certificate is not signed by a CA this system trusts; set sslrootcert to the file of the CA that signed it (for a self-signed certificate, the certificate itself), {weaker}"
            ),
        },
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => "the server's certificate has expired or is not valid yet; renew it on the server"
            .to_owned(),
        rustls::Error::InvalidCertificate(other) => {
            format!("the server's certificate was refused ({other:?}); check it, {weaker}")
        }
        other => format!("the TLS handshake failed ({other})"),
    };
    (hosts, said)
}

/// The rustls error under a connection error, if it is one: tokio-rustls wraps it in an
/// `io::Error`, whose `source` skips it.
fn rustls_error(error: &tokio_postgres::Error) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = e.source();
    }
    None
}

/// A certificate whose chain is good but whose names do not include the host.
#[derive(Debug)]
struct WrongName {
    host: String,
    names: Vec<String>,
}

impl std::fmt::Display for WrongName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the certificate is for {}, not {}",
            self.names.join(", "),
            self.host
        )
    }
}

impl std::error::Error for WrongName {}

/// `prefer` and `require`: encrypted, whoever answers. The handshake's signatures are
/// still checked, so the session is with the holder of the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

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

/// `verify-ca` (`name: false`) and `verify-full`: webpki checks the chain, then the name;
/// a name it does not find is accepted for `verify-ca`, and for `verify-full` looked for
/// in the common name when the certificate has no alternative names (libpq's rule).
#[derive(Debug)]
struct Verify {
    webpki: Arc<WebPkiServerVerifier>,
    name: bool,
}

impl ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // rustls checks the chain first: a wrong name means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            other => return other,
        }
        if !self.name {
            return Ok(ServerCertVerified::assertion());
        }
        let names = Names::of(end_entity);
        if names.alternative.is_empty() && names.common.iter().any(|cn| matches(cn, server_name)) {
            return Ok(ServerCertVerified::assertion());
        }
        let mut shown = if names.alternative.is_empty() {
            names.common
        } else {
            names.alternative
        };
        if shown.is_empty() {
            shown.push("no name".to_owned());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(WrongName {
                host: server_name.to_str().into_owned(),
                names: shown,
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The names a certificate gives its holder.
#[derive(Debug, Default)]
struct Names {
    /// Its subject alternative names: DNS names and IP addresses.
    alternative: Vec<String>,
    /// Its subject's common names, which count only when it has no alternative names.
    common: Vec<String>,
}

impl Names {
    fn of(der: &CertificateDer<'_>) -> Names {
        let Ok(cert) = x509_cert::Certificate::from_der(der) else {
            return Names::default();
        };
        let tbs = &cert.tbs_certificate;
        let alternative = tbs
            .extensions
            .iter()
            .flatten()
            .filter(|e| e.extn_id == SUBJECT_ALT_NAME)
            .filter_map(|e| SubjectAltName::from_der(e.extn_value.as_bytes()).ok())
            .flat_map(|names| names.0)
            .filter_map(|name| match name {
                GeneralName::DnsName(dns) => Some(dns.to_string()),
                GeneralName::IpAddress(ip) => match ip.as_bytes().len() {
                    4 => <[u8; 4]>::try_from(ip.as_bytes())
                        .ok()
                        .map(|b| IpAddr::from(b).to_string()),
                    16 => <[u8; 16]>::try_from(ip.as_bytes())
                        .ok()
                        .map(|b| IpAddr::from(b).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let common = tbs
            .subject
            .0
            .iter()
            .flat_map(|rdn| rdn.0.iter())
            .filter(|atv| atv.oid == COMMON_NAME)
            .filter_map(|atv| std::str::from_utf8(atv.value.value()).ok())
            .map(str::to_owned)
            .collect();
        Names {
            alternative,
            common,
        }
    }
}

/// Whether a common name names `server`: equal (ASCII case aside), or a `*.` wildcard
/// standing for one label; an IP address as an address.
fn matches(common_name: &str, server: &ServerName<'_>) -> bool {
    match server {
        ServerName::DnsName(dns) => {
            let host = dns.as_ref();
            if common_name.eq_ignore_ascii_case(host) {
                return true;
            }
            match (common_name.strip_prefix("*."), host.split_once('.')) {
                (Some(suffix), Some((label, rest))) => {
                    !label.is_empty() && rest.eq_ignore_ascii_case(suffix)
                }
                _ => false,
            }
        }
        ServerName::IpAddress(ip) => common_name.parse::<IpAddr>().ok() == Some(IpAddr::from(*ip)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(host: &str) -> ServerName<'static> {
        ServerName::try_from(host.to_owned()).expect("a server name")
    }

    #[test]
    fn a_common_name_names_its_host_its_wildcard_label_and_its_address_only() {
        assert!(matches("localhost", &name("localhost")));
        assert!(matches("DB.example.com", &name("db.example.com")));
        assert!(matches("*.example.com", &name("db.example.com")));
        assert!(!matches("*.example.com", &name("a.db.example.com")));
        assert!(!matches("*.example.com", &name("example.com")));
        assert!(!matches("localhost", &name("127.0.0.1")));
        assert!(matches("127.0.0.1", &name("127.0.0.1")));
        assert!(!matches("db.example.com", &name("db.example.org")));
    }

    #[test]
    fn each_mode_checks_what_libpq_checks() {
        let pg = |url: &str| PostgresConfig::from_url(url).expect("valid");
        let cases = [
            ("host=db sslmode=disable", Check::Nothing),
            ("host=db", Check::Nothing),
            ("host=db sslmode=require", Check::Nothing),
            ("host=db sslmode=require sslrootcert=/ca.pem", Check::Chain),
            ("host=db sslmode=prefer sslrootcert=/ca.pem", Check::Chain),
            ("host=db sslmode=verify-ca", Check::Chain),
            ("host=db sslmode=verify-full", Check::ChainAndName),
            (
                "host=db sslmode=verify-full sslrootcert=/ca.pem",
                Check::ChainAndName,
            ),
        ];
        for (url, check) in cases {
            assert_eq!(check_of(&pg(url)), check, "{url}");
        }
    }
}
