//! The credential helpers of the built binary, config checks of the security sections,
//! and `run` rejecting open listeners beyond loopback.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_stonelion");

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
    child.wait_with_output().unwrap()
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
const VERSION_1_CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----
MIIBJTCBywIUCZ5VjHiGPL8qryWrcE2y0R+eIHkwCgYIKoZIzj0EAwIwFDESMBAG
A1UEAwwJMTI3LjAuMC4xMCAXDTI2MTIwNTAwMzgyOFoYDzIxMjYxMTExMDAzODI4
WjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AAT47QV/dwhaO3CC04YEWug/oM3kLZzD6yYUETUowtwy/DESJ4reIHQweRtghrrZ
HU0TThir3sJsfgdLbI7JWO+AMAoGCCqGSM49BAMCA0kAMEYCIQDJS6RlUPfPsxmx
XaLRYoYUEEvI5xtisMyJ3QFja3C7lAIhAL6HtQlP3frkn2PeN4JUEav3/fZlmdGF
V76pGTpsEosl
-----END CERTIFICATE-----
";
const VERSION_1_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgDmuxrX5s7koi0oAH
NzT6EDFzohN0AmkI/a17kF4bWaGhRANCAAT47QV/dwhaO3CC04YEWug/oM3kLZzD
6yYUETUowtwy/DESJ4reIHQweRtghrrZHU0TThir3sJsfgdLbI7JWO+A
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
                "mqtt.tls_key: cannot read the TLS file {}",
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

    let valid = dir.path().join("valid.toml");
    std::fs::write(&valid, with_https(&path("server.pem"))).unwrap();
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

#[test]
fn run_names_a_version_1_certificate() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("v1.pem"), VERSION_1_CERTIFICATE).unwrap();
    std::fs::write(dir.path().join("v1.key"), VERSION_1_KEY).unwrap();
    let cert = dir.path().join("v1.pem").display().to_string();
    let key = dir.path().join("v1.key").display().to_string();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[api]\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"),
    )
    .unwrap();

    let data = dir.path().join("data");
    let output = stonelion(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ],
        "",
    );
    assert!(!output.status.success(), "`run` started");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected =
        format!("cannot use the TLS certificate {cert}: the first certificate is X.509 version 1");
    assert!(
        stderr.contains(&expected),
        "missing {expected:?} in:\n{stderr}"
    );
}

#[test]
fn run_rejects_empty_api_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    write_server_certificate(dir.path());
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let config = dir.path().join("config.toml");
    let text = format!(
        "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n",
        path("server.pem"),
        path("server.key"),
        path("empty.pem")
    );
    std::fs::write(&config, text).unwrap();

    let data = dir.path().join("data");
    let output = stonelion(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ],
        "",
    );
    assert!(!output.status.success(), "`run` started");

    let stderr = String::from_utf8_lossy(&output.stderr);
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
        !data.join("state.sqlite").exists(),
        "`run` opened its databases before checking the client CA"
    );
}
