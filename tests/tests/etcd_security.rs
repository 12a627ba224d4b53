//! Issue 2 §6, etcd security, against a real etcd with certificates made at run time:
//! mutual TLS, server-only TLS with username and password, failing closed on a wrong CA
//! or certificate, no fall back to plain HTTP, and a password that never reaches a log.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use flannel_agent::subnet::etcd::{EtcdError, EtcdOptions, Registry, Written};
use flannel_tests::{
    Child, Etcd, EtcdOptions as EtcdFixture, EtcdTls, NetNs, free_port, require_binary,
    require_root, run_ok, wait_until,
};
use tempfile::TempDir;

const PREFIX: &str = "/fltest/network";
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const LEASE: &str = r#"{"PublicIP":"192.0.2.7","PublicIPv6":null,"BackendType":"vxlan"}"#;
const ROOT_PW: &str = "s3cret-pw-4f9a";
const WRONG_PW: &str = "wr0ng-pw-77b1";

/// True when every external tool these tests need is present (else skip, or fail in CI).
fn tools(test: &str) -> bool {
    require_binary("etcd", test)
        && require_binary("etcdctl", test)
        && require_binary("openssl", test)
}

// ---------------------------------------------------------------------------------------
// Certificates, made with the openssl CLI
// ---------------------------------------------------------------------------------------

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = placeholder

[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// A certificate and its key, PEM files.
#[derive(Clone, Debug)]
struct Pair {
    cert: PathBuf,
    key: PathBuf,
}

/// Two unrelated CAs; a server and a client certificate from the first, a client
/// certificate from the second.
struct Pki {
    dir: TempDir,
    ca: Pair,
    server: Pair,
    client: Pair,
    other_ca: Pair,
    other_client: Pair,
}

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

fn make_ca(dir: &Path, name: &str) -> Pair {
    let (cert, key) = (format!("{name}.pem"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-config",
            "openssl.cnf",
            "-extensions",
            "ca",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    Pair {
        cert: dir.join(cert),
        key: dir.join(key),
    }
}

fn make_leaf(dir: &Path, ca: &Pair, name: &str, section: &str) -> Pair {
    let (cert, key, csr) = (
        format!("{name}.pem"),
        format!("{name}.key"),
        format!("{name}.csr"),
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-config",
            "openssl.cnf",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    let ca_cert = ca.cert.display().to_string();
    let ca_key = ca.key.display().to_string();
    let serial = ca.cert.with_extension("srl").display().to_string();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAserial",
            &serial,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            section,
        ],
    );
    Pair {
        cert: dir.join(cert),
        key: dir.join(key),
    }
}

impl Pki {
    fn generate() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("fltest-pki-")
            .tempdir()
            .expect("create pki dir");
        let d = dir.path();
        fs::write(d.join("openssl.cnf"), OPENSSL_CNF).expect("write openssl.cnf");
        let ca = make_ca(d, "fltest-ca");
        let server = make_leaf(d, &ca, "server", "server");
        let client = make_leaf(d, &ca, "client", "client");
        let other_ca = make_ca(d, "other-ca");
        let other_client = make_leaf(d, &other_ca, "other-client", "client");
        // The negative cases are only meaningful if the two chains really differ.
        run_ok(
            Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(&ca.cert)
                .arg(&server.cert)
                .arg(&client.cert),
        );
        let cross = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&ca.cert)
            .arg(&other_client.cert)
            .output()
            .expect("run openssl verify");
        assert!(
            !cross.status.success(),
            "the other client cert must not verify against the first CA"
        );
        Pki {
            dir,
            ca,
            server,
            client,
            other_ca,
            other_client,
        }
    }

    /// etcd serving HTTPS with the server certificate and requiring a client certificate
    /// from the CA (the fixture always passes --trusted-ca-file, which etcd 3.4 takes as
    /// "verify client certificates", so it cannot do server-only TLS).
    fn mutual_etcd(&self) -> Etcd {
        Etcd::start_with(self.mutual_fixture())
    }

    fn mutual_fixture(&self) -> EtcdFixture {
        EtcdFixture {
            tls: Some(EtcdTls {
                cert_file: self.server.cert.clone(),
                key_file: self.server.key.clone(),
                trusted_ca_file: self.ca.cert.clone(),
                client_cert_auth: true,
                client_cert: Some((self.client.cert.clone(), self.client.key.clone())),
            }),
            ..EtcdFixture::default()
        }
    }
}

/// etcd with server-only TLS: clients need no certificate, only the CA to verify it.
fn server_tls_etcd(pki: &Pki) -> Etcd {
    Etcd::start_with(EtcdFixture {
        tls: Some(EtcdTls {
            cert_file: pki.server.cert.clone(),
            key_file: pki.server.key.clone(),
            trusted_ca_file: pki.ca.cert.clone(),
            client_cert_auth: false,
            client_cert: None,
        }),
        ..EtcdFixture::default()
    })
}

fn opts(endpoint: &str) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![endpoint.to_owned()],
        prefix: PREFIX.to_owned(),
        ..EtcdOptions::default()
    }
}

fn with_ca(endpoint: &str, ca: &Pair) -> EtcdOptions {
    EtcdOptions {
        cafile: Some(ca.cert.clone()),
        ..opts(endpoint)
    }
}

fn mutual(endpoint: &str, ca: &Pair, client: &Pair) -> EtcdOptions {
    EtcdOptions {
        certfile: Some(client.cert.clone()),
        keyfile: Some(client.key.clone()),
        ..with_ca(endpoint, ca)
    }
}

/// Display, Debug and every source of an error: all of it may end up in a log line.
fn everything(e: &EtcdError) -> String {
    let mut s = format!("{e}\n{e:?}");
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        let _ = write!(s, "\n{cause}");
        src = cause.source();
    }
    s
}

/// Connects and expects a failure; bounded so a hang is a test failure, not a stuck run.
async fn connect_err(o: &EtcdOptions) -> EtcdError {
    match tokio::time::timeout(Duration::from_secs(30), Registry::connect(o)).await {
        Ok(Ok(_)) => panic!("connect with {o:?} succeeded but must fail"),
        Ok(Err(e)) => e,
        Err(_) => panic!("connect with {o:?} hung for 30s instead of failing"),
    }
}

async fn connect_ok(o: &EtcdOptions) -> Registry {
    match tokio::time::timeout(Duration::from_secs(30), Registry::connect(o)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("connect with {o:?} failed: {e}\n{}", everything(&e)),
        Err(_) => panic!("connect with {o:?} hung for 30s"),
    }
}

/// The registry reads the config, writes a lease and sees it, as etcdctl does.
async fn read_write(reg: &Registry, etcd: &Etcd, etcdctl_user: Option<&str>, name: &str) {
    let config = reg.get_config().await.expect("get_config");
    assert_eq!(config.as_deref(), Some(CONFIG.as_bytes()));

    let written = reg
        .create_subnet(name, LEASE, Some(60))
        .await
        .expect("create_subnet");
    let Written::Ok { etcd_lease, .. } = written else {
        panic!("create_subnet of a new key returned {written:?}");
    };
    assert_ne!(etcd_lease, 0, "a TTL'd lease is attached to an etcd lease");
    assert_eq!(
        reg.create_subnet(name, LEASE, Some(60))
            .await
            .expect("second create_subnet"),
        Written::Conflict
    );

    let (leases, rev) = reg.list_subnets().await.expect("list_subnets");
    assert!(rev > 0);
    assert!(
        leases
            .iter()
            .any(|l| l.name == name && l.value == LEASE.as_bytes()),
        "{name} not listed: {leases:?}"
    );

    let mut get = etcd.etcdctl_command();
    if let Some(u) = etcdctl_user {
        get.arg(format!("--user={u}"));
    }
    get.args(["get", "--print-value-only", "--"])
        .arg(format!("{PREFIX}/subnets/{name}"));
    assert_eq!(run_ok(&mut get).trim_end(), LEASE);
}

/// The failure was etcd refusing our certificate (not, say, a port nobody listens on):
/// etcd logs each rejected TLS connection with Go's reason.
fn assert_server_rejected(etcd: &Etcd, reason: &str) {
    let seen = wait_until(Duration::from_secs(5), || {
        etcd.log()
            .lines()
            .any(|l| l.contains("rejected connection") && l.contains(reason))
            .then_some(())
    });
    assert!(
        seen.is_some(),
        "etcd did not log a rejected connection ({reason}); log:\n{}",
        etcd.log()
    );
}

fn assert_no_password(what: &str, text: &str) {
    assert!(
        !text.contains(ROOT_PW) && !text.contains(WRONG_PW),
        "{what} contains the password:\n{text}"
    );
}

/// Turns on etcd authentication with a `root` user (over TLS, with the fixture's CA), and
/// writes the network config as root.
fn enable_auth(etcd: &Etcd) {
    etcd.etcdctl_ok(&[
        "user",
        "add",
        &format!("root:{ROOT_PW}"),
        "--interactive=false",
    ]);
    etcd.etcdctl_ok(&["auth", "enable"]);
    // Without credentials etcd now refuses; proves auth is really on.
    let anon = etcd.etcdctl(&["get", "--", "/any"]);
    assert!(!anon.status.success(), "auth enable had no effect");
    run_ok(
        etcd.etcdctl_command()
            .arg(format!("--user=root:{ROOT_PW}"))
            .args(["put", "--"])
            .arg(format!("{PREFIX}/config"))
            .arg(CONFIG),
    );
}

// ---------------------------------------------------------------------------------------
// Mutual TLS
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn mutual_tls_reads_and_writes() {
    if !tools("mutual_tls_reads_and_writes") {
        return;
    }
    let pki = Pki::generate();
    let etcd = pki.mutual_etcd();
    assert!(etcd.endpoint().starts_with("https://127.0.0.1:"));
    etcd.put(&format!("{PREFIX}/config"), CONFIG);

    let reg = connect_ok(&mutual(&etcd.endpoint(), &pki.ca, &pki.client)).await;
    assert_eq!(reg.prefix(), PREFIX);
    read_write(&reg, &etcd, None, "10.5.7.0-24").await;
}

#[tokio::test]
async fn mutual_tls_without_client_cert_fails() {
    if !tools("mutual_tls_without_client_cert_fails") {
        return;
    }
    let pki = Pki::generate();
    let etcd = pki.mutual_etcd();
    etcd.put(&format!("{PREFIX}/config"), CONFIG);

    // The server is trusted, but it demands a client certificate we do not offer.
    let e = connect_err(&with_ca(&etcd.endpoint(), &pki.ca)).await;
    assert!(
        matches!(e, EtcdError::Connect { .. }),
        "expected a Connect error, got {e:?}"
    );
    assert!(e.to_string().contains(&etcd.endpoint()), "{e}");
    assert!(e.to_string().contains("client certificate"), "no hint: {e}");
    assert_server_rejected(&etcd, "didn't provide a certificate");
}

#[tokio::test]
async fn client_cert_from_wrong_ca_fails() {
    if !tools("client_cert_from_wrong_ca_fails") {
        return;
    }
    let pki = Pki::generate();
    let etcd = pki.mutual_etcd();
    etcd.put(&format!("{PREFIX}/config"), CONFIG);

    let e = connect_err(&mutual(&etcd.endpoint(), &pki.ca, &pki.other_client)).await;
    assert!(
        matches!(e, EtcdError::Connect { .. }),
        "expected a Connect error, got {e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("cannot connect to etcd"), "{msg}");
    assert!(msg.contains(&etcd.endpoint()), "{msg}");
    assert!(msg.contains("client certificate"), "no hint: {msg}");
    assert_server_rejected(&etcd, "certificate signed by unknown authority");
}

#[tokio::test]
async fn wrong_ca_fails_closed() {
    if !tools("wrong_ca_fails_closed") {
        return;
    }
    let pki = Pki::generate();
    let etcd = pki.mutual_etcd();
    etcd.put(&format!("{PREFIX}/config"), CONFIG);

    // A valid client certificate, but we trust another CA: the server must be rejected.
    let mut o = mutual(&etcd.endpoint(), &pki.other_ca, &pki.client);
    o.username = Some("root".into());
    o.password = Some(ROOT_PW.into());
    let e = connect_err(&o).await;
    assert!(
        matches!(e, EtcdError::Connect { .. }),
        "expected a Connect error, got {e:?}"
    );
    let all = everything(&e);
    assert!(
        all.to_lowercase().contains("certificate"),
        "the error should say the certificate is the problem:\n{all}"
    );
    assert_no_password("wrong-CA error", &all);

    // Server-only TLS with the wrong CA fails the same way.
    let e = connect_err(&with_ca(&etcd.endpoint(), &pki.other_ca)).await;
    assert!(matches!(e, EtcdError::Connect { .. }), "{e:?}");
}

// ---------------------------------------------------------------------------------------
// Server-only TLS with username and password
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn server_tls_with_password_reads_and_writes() {
    if !tools("server_tls_with_password_reads_and_writes") {
        return;
    }
    let pki = Pki::generate();
    let etcd = server_tls_etcd(&pki);
    enable_auth(&etcd);

    let o = EtcdOptions {
        username: Some("root".into()),
        password: Some(ROOT_PW.into()),
        ..with_ca(&etcd.endpoint(), &pki.ca)
    };
    let reg = connect_ok(&o).await;
    read_write(&reg, &etcd, Some(&format!("root:{ROOT_PW}")), "10.5.9.0-24").await;
}

#[tokio::test]
async fn wrong_password_fails_naming_authentication() {
    if !tools("wrong_password_fails_naming_authentication") {
        return;
    }
    let pki = Pki::generate();
    let etcd = server_tls_etcd(&pki);
    enable_auth(&etcd);

    let o = EtcdOptions {
        username: Some("root".into()),
        password: Some(WRONG_PW.into()),
        ..with_ca(&etcd.endpoint(), &pki.ca)
    };
    let e = connect_err(&o).await;
    assert!(
        matches!(e, EtcdError::Connect { .. }),
        "expected a Connect error, got {e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.to_lowercase().contains("authentication"),
        "the error should name authentication: {msg}"
    );
    assert_no_password("wrong-password error", &everything(&e));

    // An unknown user fails the same way.
    let o = EtcdOptions {
        username: Some("nobody".into()),
        password: Some(ROOT_PW.into()),
        ..with_ca(&etcd.endpoint(), &pki.ca)
    };
    let e = connect_err(&o).await;
    assert!(
        e.to_string().to_lowercase().contains("authentication"),
        "{e}"
    );
    assert_no_password("unknown-user error", &everything(&e));
}

#[tokio::test]
async fn no_username_is_refused_by_etcd() {
    if !tools("no_username_is_refused_by_etcd") {
        return;
    }
    let pki = Pki::generate();
    let etcd = server_tls_etcd(&pki);
    enable_auth(&etcd);

    // TLS alone is not enough once etcd auth is on: the probe in connect must fail, so
    // the failure shows at start-up and not at the first real request.
    let e = connect_err(&with_ca(&etcd.endpoint(), &pki.ca)).await;
    assert!(
        matches!(e, EtcdError::Connect { .. }),
        "expected a Connect error, got {e:?}"
    );
    let msg = e.to_string().to_lowercase();
    assert!(
        msg.contains("permission denied") || msg.contains("user name is empty"),
        "the error should say etcd refused an anonymous request: {msg}"
    );
}

// ---------------------------------------------------------------------------------------
// No fall back to plain HTTP; invalid settings
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn http_endpoint_with_tls_files_is_refused() {
    if !tools("http_endpoint_with_tls_files_is_refused") {
        return;
    }
    let pki = Pki::generate();
    // A plain-HTTP etcd that would happily answer: TLS settings must still not be
    // dropped in favour of it.
    let plain = Etcd::start();
    assert!(plain.endpoint().starts_with("http://"));
    plain.put(&format!("{PREFIX}/config"), CONFIG);

    for o in [
        with_ca(&plain.endpoint(), &pki.ca),
        mutual(&plain.endpoint(), &pki.ca, &pki.client),
        EtcdOptions {
            certfile: Some(pki.client.cert.clone()),
            keyfile: Some(pki.client.key.clone()),
            ..opts(&plain.endpoint())
        },
        EtcdOptions {
            password: Some(ROOT_PW.into()),
            username: Some("root".into()),
            ..with_ca(&plain.endpoint(), &pki.ca)
        },
    ] {
        let e = connect_err(&o).await;
        assert!(
            matches!(e, EtcdError::TlsSettings(_)),
            "expected TlsSettings for {o:?}, got {e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("https"), "{msg}");
        assert!(msg.contains(&plain.endpoint()), "{msg}");
        assert_no_password("TLS settings error", &everything(&e));
    }

    // One https endpoint does not make a mixed list acceptable either.
    let tls = server_tls_etcd(&pki);
    let o = EtcdOptions {
        endpoints: vec![tls.endpoint(), plain.endpoint()],
        ..with_ca(&tls.endpoint(), &pki.ca)
    };
    let e = connect_err(&o).await;
    assert!(matches!(e, EtcdError::TlsSettings(_)), "{e:?}");
    assert!(e.to_string().contains(&plain.endpoint()), "{e}");
}

#[tokio::test]
async fn https_endpoint_without_cafile_is_refused() {
    if !tools("https_endpoint_without_cafile_is_refused") {
        return;
    }
    let pki = Pki::generate();
    let etcd = server_tls_etcd(&pki);
    let e = connect_err(&opts(&etcd.endpoint())).await;
    assert!(matches!(e, EtcdError::TlsSettings(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("--etcd-cafile"), "{msg}");

    // A client identity alone does not replace the CA.
    let o = EtcdOptions {
        cafile: None,
        ..mutual(&etcd.endpoint(), &pki.ca, &pki.client)
    };
    let e = connect_err(&o).await;
    assert!(matches!(e, EtcdError::TlsSettings(_)), "{e:?}");
    assert!(e.to_string().contains("--etcd-cafile"), "{e}");
}

#[tokio::test]
async fn https_to_a_plain_http_server_fails() {
    if !tools("https_to_a_plain_http_server_fails") {
        return;
    }
    let pki = Pki::generate();
    let plain = Etcd::start();
    plain.put(&format!("{PREFIX}/config"), CONFIG);
    let https = plain.endpoint().replacen("http://", "https://", 1);
    // The server only speaks plain HTTP: the TLS handshake fails and nothing is
    // retried without TLS.
    let e = connect_err(&with_ca(&https, &pki.ca)).await;
    assert!(
        matches!(e, EtcdError::Connect { .. } | EtcdError::Timeout { .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn half_or_unreadable_tls_settings_are_refused() {
    if !tools("half_or_unreadable_tls_settings_are_refused") {
        return;
    }
    let pki = Pki::generate();
    let endpoint = format!("https://127.0.0.1:{}", free_port());

    let o = EtcdOptions {
        certfile: Some(pki.client.cert.clone()),
        ..with_ca(&endpoint, &pki.ca)
    };
    let e = connect_err(&o).await;
    assert!(matches!(e, EtcdError::TlsSettings(_)), "{e:?}");
    assert!(e.to_string().contains("together"), "{e}");

    let o = EtcdOptions {
        keyfile: Some(pki.client.key.clone()),
        ..with_ca(&endpoint, &pki.ca)
    };
    let e = connect_err(&o).await;
    assert!(matches!(e, EtcdError::TlsSettings(_)), "{e:?}");

    let missing = pki.ca.cert.with_file_name("no-such-ca.pem");
    let o = EtcdOptions {
        cafile: Some(missing.clone()),
        ..opts(&endpoint)
    };
    let e = connect_err(&o).await;
    assert!(matches!(e, EtcdError::ReadFile { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );

    let o = EtcdOptions {
        username: Some("root".into()),
        ..with_ca(&endpoint, &pki.ca)
    };
    let e = connect_err(&o).await;
    assert!(matches!(e, EtcdError::TlsSettings(_)), "{e:?}");
    assert!(e.to_string().contains("--etcd-password"), "{e}");
}

// ---------------------------------------------------------------------------------------
// The password never reaches a log
// ---------------------------------------------------------------------------------------

#[test]
fn debug_of_options_redacts_the_password() {
    let o = EtcdOptions {
        endpoints: vec!["https://127.0.0.1:2379".into()],
        prefix: PREFIX.into(),
        cafile: Some("/etc/ssl/ca.pem".into()),
        certfile: None,
        keyfile: None,
        username: Some("root".into()),
        password: Some("s3cret-pw".into()),
    };
    for text in [format!("{o:?}"), format!("{o:#?}")] {
        assert!(!text.contains("s3cret-pw"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
        // The rest stays useful for diagnosis.
        assert!(text.contains("root"), "{text}");
        assert!(text.contains("https://127.0.0.1:2379"), "{text}");
    }
    let none = EtcdOptions {
        password: None,
        ..o
    };
    assert!(!format!("{none:?}").contains("<redacted>"));
}

/// Where the flanneld binary would be, if it was built; never builds it.
fn flanneld_if_built() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLANNELD_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("flanneld");
    p.is_file().then_some(p)
}

/// Optional: a flanneld that takes `--etcd-password` never prints it, whether etcd accepts
/// it or not. Runs inside a network namespace of its own (etcd too), so nothing on the
/// host is touched. Skipped while the binary does not accept the flag yet.
#[test]
fn flanneld_never_logs_the_password() {
    const NAME: &str = "flanneld_never_logs_the_password";
    let Some(bin) = flanneld_if_built() else {
        eprintln!("skipping {NAME}: flanneld is not built");
        return;
    };
    let help = Command::new(&bin).arg("--help").output();
    let accepts = help.is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout).contains("--etcd-password")
            || String::from_utf8_lossy(&o.stderr).contains("--etcd-password")
    });
    if !accepts {
        eprintln!(
            "skipping {NAME}: {} does not take --etcd-password yet",
            bin.display()
        );
        return;
    }
    if !require_root(NAME) || !tools(NAME) {
        return;
    }
    let pki = Pki::generate();
    let ns = NetNs::new("sec");
    let etcd = Etcd::start_with(EtcdFixture {
        netns: Some(ns.name().to_owned()),
        ..pki.mutual_fixture()
    });
    enable_auth(&etcd);

    for pw in [WRONG_PW, ROOT_PW] {
        let mut cmd = ns.command(&bin);
        cmd.arg(format!("--etcd-endpoints={}", etcd.endpoint()))
            .arg(format!("--etcd-prefix={PREFIX}"))
            .arg(format!("--etcd-cafile={}", pki.ca.cert.display()))
            .arg(format!("--etcd-certfile={}", pki.client.cert.display()))
            .arg(format!("--etcd-keyfile={}", pki.client.key.display()))
            .arg("--etcd-username=root")
            .arg(format!("--etcd-password={pw}"))
            .arg("--subnet-file")
            .arg(pki.dir.path().join("subnet.env"))
            .arg("-v=10")
            .env("RUST_LOG", "trace");
        let mut child = Child::spawn("flanneld", cmd);
        // Long enough to connect (or fail to) and log about it.
        let _ = child.wait_for_log("never-logged-marker", Duration::from_secs(4));
        child.kill();
        let log = child.log();
        assert_no_password("flanneld's output", &log);
        if pw == WRONG_PW {
            eprintln!("{NAME}: flanneld with a wrong password logged:\n{log}");
        }
    }
}
