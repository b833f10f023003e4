//! TLS on the HTTP API and on the MQTT over TLS listener, with certificates generated in
//! the test: HTTPS with reqwest and curl, MQTT with mosquitto_pub, and client
//! certificates on both.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use support::{Receiver, start_server, wait_for};

/// A CA with a server certificate for 127.0.0.1 and a client certificate, written as PEM
/// files into `dir`.
struct Pki {
    ca_pem: String,
}

fn issue(params: CertificateParams, ca: &Certificate, ca_key: &KeyPair, dir: &Path, name: &str) {
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca, ca_key).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Stonelion test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();

    let mut server =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "stonelion");
    server.not_after = rcgen::date_time_ymd(2100, 1, 1);
    issue(server, &ca, &ca_key, dir, "server");

    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client.distinguished_name.push(DnType::CommonName, "gas-01");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(client, &ca, &ca_key, dir, "client");

    // The same CN as a BMPString (UTF-16), which some CAs write.
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    let common_name = rcgen::BmpString::try_from("gas-01").unwrap();
    client
        .distinguished_name
        .push(DnType::CommonName, rcgen::DnValue::BmpString(common_name));
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(client, &ca, &ca_key, dir, "client-bmp");
    Pki { ca_pem: ca.pem() }
}

fn config(dir: &Path, client_ca: bool) -> String {
    let path = |name: &str| dir.join(name).display().to_string();
    let ca_line = if client_ca {
        format!("tls_client_ca = \"{}\"", path("ca.pem"))
    } else {
        String::new()
    };
    format!(
        "[mqtt]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n{ca_line}\n\n\
         [api]\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\n{}",
        support::CONFIG,
        cert = path("server.pem"),
        key = path("server.key"),
    )
}

fn mosquitto_pub(port: u16, dir: &Path, extra: &[&str], value: &str) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile"])
        .arg(dir.join("ca.pem"))
        .args([
            "-q",
            "1",
            "-i",
            "tls-test",
            "-t",
            "telemetry/plant-a/gas-01/gas_lel",
            "-m",
            value,
        ])
        .args(extra)
        .output()
        .expect("mosquitto_pub must be installed (Debian package mosquitto-clients)")
}

async fn latest_gas(client: &reqwest::Client, http: std::net::SocketAddr) -> Option<f64> {
    let url = format!("https://127.0.0.1:{}/api/v1/devices/gas-01", http.port());
    let body: serde_json::Value = client.get(url).send().await.ok()?.json().await.ok()?;
    body["latest"]["gas_lel"]["value"].as_f64()
}

/// Returns the text of `/metrics` on the HTTPS API at `port`.
async fn metrics(client: &reqwest::Client, port: u16, token: Option<&str>) -> String {
    let mut request = client.get(format!("https://127.0.0.1:{port}/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().text().await.unwrap()
}

fn https_client(pki: &Pki) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_mqtt_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    let pki = make_pki(certs.path());
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(certs.path(), false), &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let client = https_client(&pki);
    let tls = server
        .mqtt_tls_addr
        .expect("the MQTT over TLS listener is on");

    // Connections that never start their handshake must not delay the others.
    let _idle_http = tokio::net::TcpStream::connect(http).await.unwrap();
    let _idle_mqtt = tokio::net::TcpStream::connect(tls).await.unwrap();

    let health = client
        .get(format!("https://127.0.0.1:{}/healthz", http.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let plain = reqwest::get(format!("http://{http}/healthz")).await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP was served on the TLS port"
    );
    let untrusted = reqwest::get(format!("https://127.0.0.1:{}/healthz", http.port())).await;
    assert!(
        untrusted.is_err(),
        "a client without the CA accepted the certificate"
    );

    let output = mosquitto_pub(tls.port(), certs.path(), &[], "14.5");
    assert!(
        output.status.success(),
        "mosquitto_pub over TLS failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    wait_for(
        "the reading sent over TLS",
        Duration::from_secs(10),
        || async { (latest_gas(&client, http).await == Some(14.5)).then_some(()) },
    )
    .await;

    // The server certificate expires at 2100-01-01T00:00:00Z.
    let metrics = metrics(&client, http.port(), None).await;
    for listener in ["http-tls", "mqtt-tls"] {
        let sample = format!(
            "stonelion_tls_certificate_expiry_timestamp_seconds{{listener=\"{listener}\"}} \
             4102444800"
        );
        assert!(
            metrics.lines().any(|line| line == sample),
            "missing {sample} in:\n{metrics}"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_tls_requires_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let pki = make_pki(certs.path());
    // The client CA file is two files joined with `cat`, each starting with a UTF-8 byte
    // order mark, as some editors write: another CA, then the one that issued the client
    // certificates. The PEM reader skips a block that does not start its line, so each
    // byte order mark used to hide the CA after it.
    let other_key = KeyPair::generate().unwrap();
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other = other.self_signed(&other_key).unwrap();
    let bundle = format!("\u{feff}{}\u{feff}{}", other.pem(), pki.ca_pem);
    std::fs::write(certs.path().join("ca-bom.pem"), bundle).unwrap();
    let text = config(certs.path(), true).replace("ca.pem\"", "ca-bom.pem\"");
    assert!(text.contains("ca-bom.pem"));
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&text, &receiver.url(), data.path()).await;
    let tls = server
        .mqtt_tls_addr
        .expect("the MQTT over TLS listener is on");
    let dir = certs.path();

    let without = mosquitto_pub(tls.port(), dir, &[], "40");
    assert!(
        !without.status.success(),
        "a client without a certificate connected"
    );

    let cert = dir.join("client.pem").display().to_string();
    let key = dir.join("client.key").display().to_string();
    let other = mosquitto_pub(
        tls.port(),
        dir,
        &["--cert", &cert, "--key", &key, "-u", "gas-02"],
        "30",
    );
    assert!(
        !other.status.success(),
        "gas-01's certificate logged in as gas-02"
    );
    let with = mosquitto_pub(
        tls.port(),
        dir,
        &["--cert", &cert, "--key", &key, "-u", "gas-01"],
        "21.5",
    );
    assert!(
        with.status.success(),
        "mosquitto_pub with a client certificate failed: {}",
        String::from_utf8_lossy(&with.stderr)
    );
    let client = https_client(&pki);
    wait_for(
        "the reading sent with a client certificate",
        Duration::from_secs(10),
        || async { (latest_gas(&client, server.http_addr).await == Some(21.5)).then_some(()) },
    )
    .await;

    let cert = dir.join("client-bmp.pem").display().to_string();
    let key = dir.join("client-bmp.key").display().to_string();
    let bmp = mosquitto_pub(
        tls.port(),
        dir,
        &["--cert", &cert, "--key", &key, "-u", "gas-01"],
        "22.5",
    );
    assert!(
        bmp.status.success(),
        "mosquitto_pub with a BMPString CN failed: {}",
        String::from_utf8_lossy(&bmp.stderr)
    );
    wait_for(
        "the reading sent with a BMPString CN",
        Duration::from_secs(10),
        || async { (latest_gas(&client, server.http_addr).await == Some(22.5)).then_some(()) },
    )
    .await;
    let metrics = metrics(&client, server.http_addr.port(), None).await;
    let sample = r#"stonelion_mqtt_denied_total{reason="certificate_mismatch"} 1"#;
    assert!(
        metrics.lines().any(|l| l == sample),
        "missing {sample} in:\n{metrics}"
    );
    server.shutdown().await;
}

/// Hashes with a low argon2 cost, so that debug builds verify quickly. The server reads
/// the cost from the PHC string.
fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(1024, 1, 1, None).unwrap();
    let salt = SaltString::encode_b64(b"sixteen byte salt").unwrap();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// Publishes one reading to `username`'s topic over TLS, logged in as `username` with
/// `password`.
fn mosquitto_pub_login(port: u16, dir: &Path, username: &str, password: &str) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile"])
        .arg(dir.join("ca.pem"))
        .args(["-q", "1", "-i", username, "-u", username, "-P", password])
        .args([
            "-t",
            &format!("telemetry/plant-a/{username}/gas_lel"),
            "-m",
            "11",
        ])
        .output()
        .expect("mosquitto_pub must be installed (Debian package mosquitto-clients)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_tls_backs_off_failing_source() {
    let certs = tempfile::tempdir().unwrap();
    let pki = make_pki(certs.path());
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let mut text = config(certs.path(), false).replace(
        "[mqtt]\n",
        "[mqtt]\nmax_failed_logins = 3\nfailed_login_backoff = \"1h\"\n",
    );
    for device in ["gas-01", "gas-02"] {
        let entry = format!("id = \"{device}\"\nsite = \"plant-a\"\nprofile = \"gas-detector\"\n");
        let hash = cheap_hash(&format!("pw-{device}"));
        let with_hash = format!("{entry}mqtt_password_hash = \"{hash}\"\n");
        assert!(text.contains(&entry), "the shared config has {device}");
        text = text.replace(&entry, &with_hash);
    }
    // Started from a file, so that devices can be managed through the API.
    let config_path = data.path().join("stonelion.toml");
    std::fs::write(&config_path, text.replace("WEBHOOK_URL", &receiver.url())).unwrap();
    let file = stonelion::config::managed::ConfigFile {
        path: config_path,
        overrides: stonelion::config::Overrides {
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            mqtt_listen: Some("127.0.0.1:0".parse().unwrap()),
            data_dir: Some(data.path().join("data")),
        },
    };
    let clock = std::sync::Arc::new(stonelion::clock::SystemClock);
    let server = stonelion::server::Server::start_with_file(file, clock)
        .await
        .unwrap();
    let tls = server
        .mqtt_tls_addr
        .expect("the MQTT over TLS listener is on");
    let port = tls.port();
    let dir = certs.path();
    let http = server.http_addr;
    let backoff_sample = r#"stonelion_mqtt_denied_total{reason="login_backoff"}"#;
    let metric = |sample: &'static str| {
        let client = https_client(&pki);
        async move {
            let url = format!("https://127.0.0.1:{}/metrics", http.port());
            let text = client.get(url).send().await.unwrap().text().await.unwrap();
            text.lines()
                .find_map(|line| line.strip_prefix(sample)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        }
    };

    let first = mosquitto_pub_login(port, dir, "gas-01", "pw-gas-01");
    assert!(
        first.status.success(),
        "gas-01's first login failed: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    // Three usernames, one failure each: only the source reaches the limit.
    for n in 1..=3 {
        let username = format!("intruder-{n}");
        let output = mosquitto_pub_login(port, dir, &username, "guessed");
        assert!(!output.status.success(), "{username} logged in");
    }
    assert_eq!(metric(backoff_sample).await, 0.0);

    let uncached = mosquitto_pub_login(port, dir, "gas-02", "pw-gas-02");
    assert!(
        !uncached.status.success(),
        "an uncached login from a source in backoff got through"
    );
    assert_eq!(metric(backoff_sample).await, 1.0);

    let cached = mosquitto_pub_login(port, dir, "gas-01", "pw-gas-01");
    assert!(
        cached.status.success(),
        "gas-01's cached login was denied during its source's backoff: {}",
        String::from_utf8_lossy(&cached.stderr)
    );
    assert_eq!(metric(backoff_sample).await, 1.0);

    // The plain listener does not see the source, so gas-02 logs in there.
    let plain = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.mqtt_addr.port().to_string(),
        ])
        .args(["-q", "1", "-i", "gas-02", "-u", "gas-02", "-P", "pw-gas-02"])
        .args(["-t", "telemetry/plant-a/gas-02/gas_lel", "-m", "12"])
        .output()
        .unwrap();
    assert!(
        plain.status.success(),
        "gas-02 on the plain listener: {}",
        String::from_utf8_lossy(&plain.stderr)
    );

    // A password change ends the source backoffs, which may count a device's retries with
    // its old password: a new device gets in over TLS from the same source.
    let url = format!("https://127.0.0.1:{}/api/v1/devices/gas-09", http.port());
    let device = serde_json::json!({
        "site": "plant-a",
        "profile": "gas-detector",
        "mqtt_password_hash": cheap_hash("pw-gas-09"),
    });
    let response = https_client(&pki)
        .put(url)
        .json(&device)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let after_change = mosquitto_pub_login(port, dir, "gas-09", "pw-gas-09");
    assert!(
        after_change.status.success(),
        "a new account's login was denied by the source backoff: {}",
        String::from_utf8_lossy(&after_change.stderr)
    );
    server.shutdown().await;
}

/// A viewer token for the HTTPS tests with client certificates.
const VIEWER_TOKEN: &str = "viewer-token-0123456789abcdef0123456789abcdef";

/// HTTPS that requires client certificates from `ca.pem` in `dir`, and a viewer token.
fn client_certificate_config(dir: &Path) -> String {
    use sha2::Digest as _;

    let path = |name: &str| dir.join(name).display().to_string();
    let digest = hex::encode(sha2::Sha256::digest(VIEWER_TOKEN.as_bytes()));
    format!(
        "[api]\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\ntls_client_ca = \"{ca}\"\n\n\
         [[api_tokens]]\nname = \"wall-display\"\nrole = \"viewer\"\ntoken_sha256 = \"{digest}\"\n\n{}",
        support::CONFIG,
        cert = path("server.pem"),
        key = path("server.key"),
        ca = path("ca.pem"),
    )
}

/// Builds an HTTPS client that trusts `pki`'s CA and presents the client certificate in `dir`.
fn https_client_with_certificate(pki: &Pki, dir: &Path) -> reqwest::Client {
    let mut pem = std::fs::read(dir.join("client.pem")).unwrap();
    pem.extend(std::fs::read(dir.join("client.key")).unwrap());
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

async fn get_status(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> reqwest::Result<u16> {
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    Ok(request.send().await?.status().as_u16())
}

/// Runs curl against the API and returns its exit status and stderr.
async fn curl(dir: &Path, url: &str, certificate: Option<&Path>) -> (Option<i32>, String) {
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["--silent", "--show-error", "--fail", "--max-time", "10"])
        .arg("--cacert")
        .arg(dir.join("ca.pem"))
        .args(["--header", &format!("Authorization: Bearer {VIEWER_TOKEN}")]);
    if let Some(certificate_dir) = certificate {
        command
            .arg("--cert")
            .arg(certificate_dir.join("client.pem"))
            .arg("--key")
            .arg(certificate_dir.join("client.key"));
    }
    let output = command
        .arg(url)
        .output()
        .await
        .expect("curl must be installed (Debian package curl)");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_client_ca_names_near_limit() {
    let certs = tempfile::tempdir().unwrap();
    let pki = make_pki(certs.path());
    // 265 more CAs with 200-character names: about 57,800 bytes of names in the
    // certificate request, under the limit of 60,000 but near the 65,535 of TLS.
    let key = KeyPair::generate().unwrap();
    let mut bundle = String::new();
    for n in 0..265 {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{n:0>200}"));
        bundle.push_str(&params.self_signed(&key).unwrap().pem());
    }
    bundle.push_str(&pki.ca_pem);
    std::fs::write(certs.path().join("ca.pem"), bundle).unwrap();
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let config = client_certificate_config(certs.path());
    let server = start_server(&config, &receiver.url(), data.path()).await;

    // reqwest negotiates TLS 1.3, whose certificate request carries the names next to
    // the signature algorithms.
    let trusted = https_client_with_certificate(&pki, certs.path());
    let url = format!(
        "https://127.0.0.1:{}/api/v1/devices",
        server.http_addr.port()
    );
    let status = get_status(&trusted, &url, Some(VIEWER_TOKEN)).await;
    assert_eq!(status.unwrap(), 200, "a client of the last CA in the file");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_requires_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let pki = make_pki(certs.path());
    let other_certs = tempfile::tempdir().unwrap();
    let other_pki = make_pki(other_certs.path());
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let config = client_certificate_config(certs.path());
    let server = start_server(&config, &receiver.url(), data.path()).await;
    let port = server.http_addr.port();
    let devices = format!("https://127.0.0.1:{port}/api/v1/devices");

    let trusted = https_client_with_certificate(&pki, certs.path());
    let status = get_status(&trusted, &devices, Some(VIEWER_TOKEN)).await;
    assert_eq!(status.unwrap(), 200, "a client with a valid certificate");
    let status = get_status(&trusted, &devices, None).await;
    assert_eq!(
        status.unwrap(),
        401,
        "a certificate does not replace the token"
    );

    let without = get_status(&https_client(&pki), &devices, Some(VIEWER_TOKEN)).await;
    assert!(
        without.is_err(),
        "a client without a certificate got {without:?}"
    );
    // The other CA's client trusts this server's CA, so only its certificate is wrong.
    let mut pem = std::fs::read(other_certs.path().join("client.pem")).unwrap();
    pem.extend(std::fs::read(other_certs.path().join("client.key")).unwrap());
    let foreign = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let status = get_status(&foreign, &devices, Some(VIEWER_TOKEN)).await;
    assert!(
        status.is_err(),
        "a client with another CA's certificate got {status:?}"
    );
    assert_ne!(other_pki.ca_pem, pki.ca_pem);

    // A new connection after the rejected handshakes is still served.
    let fresh = https_client_with_certificate(&pki, certs.path());
    let status = get_status(&fresh, &devices, Some(VIEWER_TOKEN)).await;
    assert_eq!(status.unwrap(), 200, "a valid client after rejected ones");

    let metrics = metrics(&fresh, port, Some(VIEWER_TOKEN)).await;
    for reason in ["no_client_certificate", "invalid_client_certificate"] {
        let sample = format!(
            "stonelion_tls_handshake_failures_total{{listener=\"http-tls\",reason=\"{reason}\"}} 1"
        );
        assert!(
            metrics.lines().any(|l| l == sample),
            "missing {sample} in:\n{metrics}"
        );
    }

    // curl is an independent TLS client (OpenSSL or GnuTLS, as the system builds it).
    let dir = certs.path();
    let (code, stderr) = curl(dir, &devices, Some(dir)).await;
    assert_eq!(code, Some(0), "curl with a client certificate: {stderr}");
    let (code, _) = curl(dir, &devices, None).await;
    assert_ne!(code, Some(0), "curl without a client certificate succeeded");
    let (code, _) = curl(dir, &devices, Some(other_certs.path())).await;
    assert_ne!(
        code,
        Some(0),
        "curl with another CA's client certificate succeeded"
    );
    let (code, stderr) = curl(dir, &devices, Some(dir)).await;
    assert_eq!(code, Some(0), "curl after rejected handshakes: {stderr}");
    server.shutdown().await;
}
