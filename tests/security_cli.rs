//! The credential helpers of the built binary, config checks of the security sections,
//! and `run` rejecting open listeners beyond loopback.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chrono::Datelike as _;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_stonelion");

/// Runs the binary with `stdin`, and fails the test when it has not exited within a
/// minute, so that a command that blocks shows up as a failure.
fn stonelion(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("STONELION_HTTP_LISTEN")
        .env_remove("STONELION_MQTT_LISTEN")
        .env_remove("STONELION_DATA_DIR")
        .env_remove("STONELION_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let (done, exited) = std::sync::mpsc::channel();
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        if exited.recv_timeout(Duration::from_secs(60)).is_err() {
            // The test fails below when the process was killed.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    });
    let output = child.wait_with_output().unwrap();
    let _ = done.send(());
    watchdog.join().unwrap();
    assert!(
        output.status.code().is_some(),
        "`stonelion {}` did not exit within 60 s",
        args.join(" ")
    );
    output
}

/// Writes `text` as the config of a server in `dir`, runs `stonelion run` with it on
/// loopback ports picked by the system, checks that it failed to start, and returns its
/// standard error.
fn start_failure(dir: &std::path::Path, text: &str) -> String {
    let config = dir.join("config.toml");
    std::fs::write(&config, text).unwrap();
    let output = stonelion(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            dir.join("data").to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ],
        "",
    );
    assert!(!output.status.success(), "`run` started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn hash_password_prints_verifiable_hash() {
    let output = stonelion(&["hash-password"], "s3cret pass\n");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let hash = stdout(&output).trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(
        stonelion::security::verify_password(b"s3cret pass", &hash),
        "the line ending was hashed too"
    );
    assert!(!stonelion::security::verify_password(
        b"s3cret pass\n",
        &hash
    ));

    let empty = stonelion(&["hash-password"], "");
    assert!(!empty.status.success(), "an empty password was hashed");
    assert!(String::from_utf8_lossy(&empty.stderr).contains("standard input is empty"));
}

#[test]
fn generated_token_matches_its_digest() {
    let output = stonelion(&["generate-token"], "");
    assert!(output.status.success());
    let text = stdout(&output);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let token = field("token:");
    let digest = field("token_sha256:");
    assert_eq!(token.len(), 64, "32 random bytes in hex");
    assert_eq!(digest, hex::encode(Sha256::digest(token.as_bytes())));

    let hashed = stonelion(&["hash-token"], &format!("{token}\n"));
    assert!(hashed.status.success());
    assert_eq!(stdout(&hashed).trim(), digest);
}

#[test]
fn check_config_reports_security_problems() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = r#"
[mqtt]
tls_cert = "server.pem"

[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[devices]]
id = "gas-01"
site = "plant-a"
profile = "gas-detector"
mqtt_password_hash = "plain-text-password"

[[devices]]
id = "gas-02"
site = "plant-a"
profile = "gas-detector"

[[mqtt_users]]
username = "gas-02"
password_hash = "$argon2id$v=19$m=1024,t=1,p=1$c2l4dGVlbiBieXRlIHNhbHQ$1HqTgW0mJ7Ju1a3Rv4j5Kb0c3wTg7m2vZx0yE8n1o5Q"
sites = ["nowhere"]

[[api_tokens]]
name = "ops"
role = "operator"
token_sha256 = "abc"

[[api_tokens]]
name = "ops"
role = "superuser"
token_sha256 = "abc"
"#;
    std::fs::write(&path, text).unwrap();
    let output = stonelion(&["check-config", path.to_str().unwrap()], "");
    assert!(!output.status.success());
    let report = stdout(&output);
    let expected = [
        "mqtt.tls_cert: is set but `tls_listen` is not",
        "devices[0].mqtt_password_hash: invalid password hash",
        "mqtt_users[0].username: `gas-02` is a device id",
        "mqtt_users[0].sites: unknown site `nowhere`",
        "api_tokens[0].token_sha256: `token_sha256` must be 64 hex digits",
        "api_tokens[1].role: unknown variant `superuser`",
    ];
    for line in expected {
        assert!(report.contains(line), "missing {line:?} in:\n{report}");
    }
    assert!(
        !report.contains("plain-text-password"),
        "the problem report repeats the hash:\n{report}"
    );
}

#[test]
fn run_rejects_listeners_on_one_port() {
    let data = tempfile::tempdir().unwrap();
    // Refused before anything binds, so the port is never opened.
    let args = [
        "run",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--mqtt-listen",
        "127.0.0.1:18830",
        "--http-listen",
        "0.0.0.0:18830",
    ];
    let output = stonelion(&args, "");
    assert!(!output.status.success(), "`run` started on one port twice");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "the HTTP listener on 0.0.0.0:18830 ([server] http_listen, --http-listen or \
             STONELION_HTTP_LISTEN) and the MQTT listener on 127.0.0.1:18830 ([server] \
             mqtt_listen, --mqtt-listen or STONELION_MQTT_LISTEN) cannot share port 18830"
        ),
        "{stderr}"
    );
}

#[test]
fn run_port_in_use_names_setting() {
    let data = tempfile::tempdir().unwrap();
    let occupied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = occupied.local_addr().unwrap().to_string();
    let cases = [
        (
            [
                "--http-listen",
                port.as_str(),
                "--mqtt-listen",
                "127.0.0.1:0",
            ],
            format!(
                "cannot listen for HTTP on {port}: Address already in use (os error 98); another \
                 process holds the port; stop it or change [server] http_listen, --http-listen \
                 or STONELION_HTTP_LISTEN"
            ),
        ),
        (
            [
                "--http-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                port.as_str(),
            ],
            format!(
                "cannot listen for MQTT on {port}: Address already in use (os error 98); another \
                 process holds the port; stop it or change [server] mqtt_listen, --mqtt-listen \
                 or STONELION_MQTT_LISTEN"
            ),
        ),
    ];
    for (listen, message) in cases {
        let mut args = vec!["run", "--data-dir", data.path().to_str().unwrap()];
        args.extend(listen);
        let output = stonelion(&args, "");
        assert!(
            !output.status.success(),
            "`run {}` started",
            listen.join(" ")
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&message), "{stderr}");
    }
}

#[test]
fn run_rejects_open_wildcard_listener() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();
    let cases = [
        (
            ["--mqtt-listen", "0.0.0.0:0", "--http-listen", "127.0.0.1:0"],
            "MQTT broker would accept anyone on 0.0.0.0:0",
        ),
        (
            ["--mqtt-listen", "127.0.0.1:0", "--http-listen", "0.0.0.0:0"],
            "HTTP API would accept anyone on 0.0.0.0:0",
        ),
    ];
    for (listen, message) in cases {
        let mut args = vec!["run", "--data-dir", data_dir];
        args.extend(listen);
        let output = stonelion(&args, "");
        assert!(
            !output.status.success(),
            "`run {}` started",
            listen.join(" ")
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{stderr}");
    }
}

/// A self-signed X.509 version 1 certificate for 127.0.0.1, valid until 2126, made with
/// `openssl x509 -req -signkey` and no extensions, and its P-256 key.
const VERSION_1_CERTIFICATE: &str = include_str!("data/version-1-self-signed.pem");
const VERSION_1_KEY: &str = include_str!("data/version-1-self-signed.key");

/// An RSA key of 1,024 bits, which rustls does not sign with.
const RSA_1024_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIICdwIBADANBgkqhkiG9w0BAQEFAASCAmEwggJdAgEAAoGBALxj96256/GWUetk
xlkIPOX6LLH/rxvW5C3Nn7bqIwpQw58qTA0liNwnwY5WhiOs7hFOGr41bqHDkZWh
bJXVW6UhcNq77AnZJjknePmztqJ7fZLcP+OQGuxE0c55kRHdmwSacbcddIh91F9Z
CUP/1wDrBV6Mmz/SuT5fikYIOpRNAgMBAAECgYEAigxXOp67HtUgQnYeQq+esIea
qPTLxIK7wjSjjM4Vz0FPmBrOj/OpTmpzk3Ij6ZCXA2dQgYF2CGPfEt6vSzyFYkIg
dGbtSvTNvbUz+/Ja3qz1ZmrUjqbgXUHHHehVY2KfDBbtlVnVGmLu2sHAWrbMfZ5B
ioyJ/Kuj9y792Nvqp6ECQQDhbMfw01PWPYDHizfPa76dlCFI4N6wjMzXZBV/F1Lg
vZnmBx1wO8uNQT7ImuX+RcNRYRwZ3ZzkeAZghSAOxziLAkEA1fFGT+2AT0h8/yhN
pj/3p7sHC979ZFumus58jYqy9jMDTPMrp588Jo6efh6jpoYWLmSg4A8q+2LZ0coK
7YiphwJAQZ8vHRYHw8gnou8OEh2lYa3repGrge2a++CwuUyK3c2T7XiIw1FE0hv6
MN+WsEySrS/9xDHVKFUgVhyq1mJ8PQJBAJMH7jqgDr5uIvl4yWSoMZukfYM7DQob
sspPfmoIGFX7WRlZRXc9iCk3etVSWUXogPYBUk6qHfAGT4xOPpRgh6ECQBi3xfad
Qz4TubsYZgpi5mI2gqrWN6efVLSTvJMUSPP1nvVfJAl3yyhcoV8muJ/W/1VG/7v9
5k9fgYAefqF+i9E=
-----END PRIVATE KEY-----
";

/// Writes a self-signed server certificate and its key as `server.pem` and `server.key`.
fn write_server_certificate(dir: &std::path::Path) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let certificate = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("server.pem"), certificate.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

#[test]
fn check_config_rejects_unusable_tls_files() {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;

    let dir = tempfile::tempdir().unwrap();
    write_server_certificate(dir.path());
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.path().join("other.key"), other.serialize_pem()).unwrap();
    let pem = std::fs::read_to_string(dir.path().join("server.pem")).unwrap();
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    std::fs::write(dir.path().join("server.der"), der.as_ref()).unwrap();
    std::fs::write(dir.path().join("text.key"), "not a key").unwrap();
    let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjAp\n\
                     -----END ENCRYPTED PRIVATE KEY-----\n";
    std::fs::write(dir.path().join("encrypted.key"), encrypted).unwrap();
    let traditional = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
                       DEK-Info: AES-256-CBC,292254ED986F2FF4244D2AE1AF25E4CC\n\n\
                       MIIBvTBXBgkqhkiG9w0BBQ0wSjAp\n-----END RSA PRIVATE KEY-----\n";
    std::fs::write(dir.path().join("traditional.key"), traditional).unwrap();
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    std::fs::write(dir.path().join("v1.pem"), VERSION_1_CERTIFICATE).unwrap();
    std::fs::write(dir.path().join("v1.key"), VERSION_1_KEY).unwrap();
    // A certificate whose PEM block holds bytes that are not a certificate.
    std::fs::write(
        dir.path().join("not-x509.pem"),
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("rsa1024.key"), RSA_1024_KEY).unwrap();
    let fifo = dir.path().join("fifo.pem");
    let mkfifo = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(mkfifo.success(), "mkfifo failed");
    // A client CA file holding a device certificate instead of its CA.
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["gas-01".to_owned()])
        .unwrap()
        .self_signed(&leaf_key)
        .unwrap();
    std::fs::write(dir.path().join("leaf.pem"), leaf.pem()).unwrap();
    // 300 CAs with 200-character names: over the 65,535 bytes of CA names that a TLS
    // certificate request can carry.
    let mut bundle = String::new();
    for n in 0..300 {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{n:0>200}"));
        bundle.push_str(&params.self_signed(&leaf_key).unwrap().pem());
    }
    std::fs::write(dir.path().join("many-cas.pem"), bundle).unwrap();
    // A certificate whose notAfter ends in a lowercase `z`, which RFC 5280 does not allow.
    let mut der = der.to_vec();
    let at = der
        .windows(2)
        .rposition(|w| w[0] == 0x17 && w[1] == 13)
        .expect("a UTCTime");
    assert_eq!(der[at + 14], b'Z');
    der[at + 14] = b'z';
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
    );
    std::fs::write(dir.path().join("lowercase-z.pem"), pem).unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let with_https = |ca: &str| {
        format!(
            "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{ca}\"\n",
            path("server.pem"),
            path("server.key")
        )
    };
    let cases = [
        (
            "without-https",
            "[api]\ntls_client_ca = \"ca.pem\"\n".to_owned(),
            "api.tls_client_ca: is set but `tls_cert` and `tls_key` are not; client \
             certificates need HTTPS, so set both or remove `tls_client_ca`"
                .to_owned(),
        ),
        (
            "garbage-certificate",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("empty.pem"),
                path("server.key")
            ),
            format!(
                "api.tls_cert: the TLS file {} contains no certificate",
                path("empty.pem")
            ),
        ),
        (
            "key-of-another-certificate",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("server.pem"),
                path("other.key")
            ),
            format!(
                "api.tls_key: the TLS key {} does not belong to the first certificate in {}; \
                 use the key that the certificate was issued for",
                path("other.key"),
                path("server.pem")
            ),
        ),
        (
            "encrypted-key",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("server.pem"),
                path("encrypted.key")
            ),
            format!(
                "api.tls_key: the TLS key {} is encrypted",
                path("encrypted.key")
            ),
        ),
        (
            "traditional-encrypted-key",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("server.pem"),
                path("traditional.key")
            ),
            format!(
                "api.tls_key: the TLS key {} is encrypted",
                path("traditional.key")
            ),
        ),
        (
            "version-1-certificate",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("v1.pem"),
                path("v1.key")
            ),
            format!(
                "api.tls_cert: cannot use the TLS certificate {}: the first certificate is \
                 X.509 version 1, and TLS needs version 3",
                path("v1.pem")
            ),
        ),
        (
            "version-1-certificate-without-key",
            format!(
                "[mqtt]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("v1.pem"),
                path("missing.key")
            ),
            format!(
                "mqtt.tls_cert: cannot use the TLS certificate {}: the first certificate is \
                 X.509 version 1",
                path("v1.pem")
            ),
        ),
        (
            "certificate-that-is-not-x509",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("not-x509.pem"),
                path("server.key")
            ),
            format!(
                "api.tls_cert: cannot use the TLS certificate {}: ",
                path("not-x509.pem")
            ),
        ),
        (
            "certificate-that-is-not-x509-without-key",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("not-x509.pem"),
                path("missing.key")
            ),
            format!(
                "api.tls_cert: cannot use the TLS certificate {}: webpki cannot parse its \
                 first certificate",
                path("not-x509.pem")
            ),
        ),
        (
            "fifo-certificate",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                fifo.display(),
                path("server.key")
            ),
            format!(
                "api.tls_cert: cannot read the TLS file {}: it is not a regular file",
                fifo.display()
            ),
        ),
        (
            "endless-key",
            format!(
                "[mqtt]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\n\
                 tls_key = \"/dev/zero\"\n",
                path("server.pem"),
            ),
            "mqtt.tls_key: cannot read the TLS file /dev/zero: it is not a regular file".to_owned(),
        ),
        (
            "certificate-as-key",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("server.pem"),
                path("server.pem")
            ),
            format!(
                "api.tls_key: the TLS key file {} contains no PEM private key",
                path("server.pem")
            ),
        ),
        (
            "rsa-1024-key",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("missing.pem"),
                path("rsa1024.key")
            ),
            format!(
                "api.tls_key: rustls cannot sign with the TLS key {}",
                path("rsa1024.key")
            ),
        ),
        (
            // One fix only, at the end of the line.
            "fifo-client-ca",
            with_https(&fifo.display().to_string()),
            format!(
                "api.tls_client_ca: cannot use the client CA file {}: it is not a regular file \
                 (a directory, FIFO or device); name a regular file\n",
                fifo.display()
            ),
        ),
        (
            "device-certificate-as-client-ca",
            with_https(&path("leaf.pem")),
            format!(
                "api.tls_client_ca: cannot use the client CA file {}: certificate 1 of the \
                 file is not a CA certificate",
                path("leaf.pem")
            ),
        ),
        (
            "client-ca-names-over-tls-limit",
            with_https(&path("many-cas.pem")),
            format!(
                "api.tls_client_ca: cannot use the client CA file {}: its 300 CA certificates \
                 have",
                path("many-cas.pem")
            ),
        ),
        (
            "unreadable-validity",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("lowercase-z.pem"),
                path("server.key")
            ),
            format!(
                "api.tls_cert: cannot use the TLS certificate {}: the validity dates of \
                 certificate 1 cannot be read",
                path("lowercase-z.pem")
            ),
        ),
        (
            "der-certificate-without-key",
            format!(
                "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("server.der"),
                path("missing.key")
            ),
            format!(
                "api.tls_cert: the TLS file {} contains no certificate",
                path("server.der")
            ),
        ),
        (
            "text-key-without-certificate",
            format!(
                "[mqtt]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                path("missing.pem"),
                path("text.key")
            ),
            format!(
                "mqtt.tls_key: the TLS key file {} contains no PEM private key",
                path("text.key")
            ),
        ),
        (
            "empty-mqtt-client-ca",
            format!(
                "[mqtt]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
                 tls_client_ca = \"{}\"\n",
                path("server.pem"),
                path("server.key"),
                path("empty.pem")
            ),
            format!(
                "mqtt.tls_client_ca: cannot use the client CA file {}: it contains no PEM \
                 certificate",
                path("empty.pem")
            ),
        ),
        (
            "empty-file",
            with_https(&path("empty.pem")),
            format!(
                "api.tls_client_ca: cannot use the client CA file {}: it contains no PEM \
                 certificate; write the PEM certificates of the CA that issues the client \
                 certificates there",
                path("empty.pem")
            ),
        ),
    ];
    for (name, text, expected) in cases {
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, text).unwrap();
        let output = stonelion(&["check-config", config.to_str().unwrap()], "");
        let report = stdout(&output);
        assert!(!output.status.success(), "{name}: accepted:\n{report}");
        assert!(
            report.contains(&expected),
            "{name}: missing {expected:?} in:\n{report}"
        );
    }

    // A config with problems still shows its warnings: the certificate of the
    // unsupported key's case is missing.
    let config = dir.path().join("rsa-1024-key.toml");
    let report = stdout(&stonelion(&["check-config", config.to_str().unwrap()], ""));
    let expected = format!("api.tls_cert: warning: cannot open {}", path("missing.pem"));
    assert!(
        report.contains(&expected),
        "missing {expected:?} in:\n{report}"
    );

    let valid = dir.path().join("valid.toml");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(
        dir.path().join("ca.pem"),
        ca.self_signed(&ca_key).unwrap().pem(),
    )
    .unwrap();
    std::fs::write(&valid, with_https(&path("ca.pem"))).unwrap();
    let output = stonelion(&["check-config", valid.to_str().unwrap()], "");
    assert!(
        output.status.success(),
        "a readable client CA was rejected:\n{}",
        stdout(&output)
    );

    // A file that does not exist yet may be installed after the check, like the
    // certificate and key.
    let missing = dir.path().join("missing.toml");
    std::fs::write(&missing, with_https(&path("missing.pem"))).unwrap();
    let output = stonelion(&["check-config", missing.to_str().unwrap()], "");
    let report = stdout(&output);
    assert!(
        output.status.success(),
        "a missing client CA was rejected:\n{report}"
    );
    let expected = format!(
        "api.tls_client_ca: warning: cannot open {}",
        path("missing.pem")
    );
    assert!(
        report.contains(&expected),
        "missing {expected:?} in:\n{report}"
    );
}

/// Runs `check-config` on an `[api]` section with `cert` and the `server.key` of `dir`,
/// checks that it passed, and returns its report.
fn check_with_key(dir: &std::path::Path, name: &str, cert: &std::path::Path) -> String {
    let config = dir.join(format!("{name}.toml"));
    let text = format!(
        "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        dir.join("server.key").display()
    );
    std::fs::write(&config, text).unwrap();
    let output = stonelion(&["check-config", config.to_str().unwrap()], "");
    let report = stdout(&output);
    // Dates are warnings: the certificate may be replaced before the server starts.
    assert!(output.status.success(), "{name}: rejected:\n{report}");
    report
}

#[test]
fn check_config_warns_of_certificate_dates() {
    let dir = tempfile::tempdir().unwrap();
    let today = chrono::Utc::now().date_naive();
    let date = |days: i64| {
        let day = today + chrono::TimeDelta::days(days);
        rcgen::date_time_ymd(
            day.year(),
            u8::try_from(day.month()).unwrap(),
            u8::try_from(day.day()).unwrap(),
        )
    };
    let key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    let cases = [
        ("expired", date(-400), date(-30), "expired at"),
        ("not-yet-valid", date(30), date(400), "is not valid before"),
        ("expiring", date(-30), date(10), "expires at"),
    ];
    // A chain whose intermediate expires before the server's certificate.
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.not_before = date(-400);
    ca.not_after = date(10);
    let ca = ca.self_signed(&key).unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    leaf.not_before = date(-30);
    leaf.not_after = date(400);
    let leaf = leaf.signed_by(&key, &ca, &key).unwrap();
    let chain = dir.path().join("chain.pem");
    std::fs::write(&chain, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
    let report = check_with_key(dir.path(), "chain", &chain);
    let expected = format!(
        "api.tls_cert: warning: certificate 2 of the chain in {} expires at",
        chain.display()
    );
    assert!(
        report.contains(&expected),
        "missing {expected:?} in:\n{report}"
    );

    for (name, not_before, not_after, expected) in cases {
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = dir.path().join(format!("{name}.pem"));
        std::fs::write(&cert, params.self_signed(&key).unwrap().pem()).unwrap();
        let report = check_with_key(dir.path(), name, &cert);
        let expected = format!(
            "api.tls_cert: warning: the certificate in {} {expected}",
            cert.display()
        );
        assert!(
            report.contains(&expected),
            "{name}: missing {expected:?} in:\n{report}"
        );
    }
}

#[test]
fn run_names_a_version_1_certificate() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("v1.pem"), VERSION_1_CERTIFICATE).unwrap();
    std::fs::write(dir.path().join("v1.key"), VERSION_1_KEY).unwrap();
    let cert = dir.path().join("v1.pem").display().to_string();
    let key = dir.path().join("v1.key").display().to_string();
    let text = format!("[api]\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n");

    let stderr = start_failure(dir.path(), &text);
    let expected =
        format!("cannot use the TLS certificate {cert}: the first certificate is X.509 version 1");
    assert!(
        stderr.contains(&expected),
        "missing {expected:?} in:\n{stderr}"
    );
}

#[test]
fn run_refuses_a_fifo_before_the_broker_listens() {
    let dir = tempfile::tempdir().unwrap();
    write_server_certificate(dir.path());
    let fifo = dir.path().join("fifo.pem");
    let mkfifo = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(mkfifo.success(), "mkfifo failed");
    let text = format!(
        "[mqtt]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        fifo.display(),
        dir.path().join("server.key").display()
    );

    let stderr = start_failure(dir.path(), &text);
    let expected = format!(
        "cannot read the TLS file {}: it is not a regular file",
        fifo.display()
    );
    assert!(
        stderr.contains(&expected),
        "missing {expected:?} in:\n{stderr}"
    );
    // The MQTT TLS files are loaded before anything listens, so no device could have
    // had a message acknowledged by a server that then failed to start.
    assert!(
        !stderr.contains("embedded MQTT broker listening"),
        "the broker listened before the TLS files were checked:\n{stderr}"
    );
}

#[test]
fn run_rejects_empty_api_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    write_server_certificate(dir.path());
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let text = format!(
        "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n",
        path("server.pem"),
        path("server.key"),
        path("empty.pem")
    );

    let stderr = start_failure(dir.path(), &text);
    let expected = format!(
        "invalid [api] tls_client_ca: cannot use the client CA file {}: it contains no PEM \
         certificate",
        path("empty.pem")
    );
    assert!(
        stderr.contains(&expected),
        "missing {expected:?} in:\n{stderr}"
    );
    assert!(
        !dir.path().join("data/state.sqlite").exists(),
        "`run` opened its databases before checking the client CA"
    );
}
