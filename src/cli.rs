//! Command-line interface: `run`, `demo`, `check-config`, `profiles check`, and the
//! credential helpers `hash-password`, `generate-token` and `hash-token`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::clock::SystemClock;
use crate::config::managed::ConfigFile;
use crate::config::{self, Config, Overrides, builtin::builtin_profiles};
use crate::server::Server;

#[derive(Debug, Parser)]
#[command(
    name = "stonelion",
    version,
    about = "Safety-production telemetry and alarm server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Run {
        /// Config file; without it the server runs on the built-in defaults.
        #[arg(long, short, env = "STONELION_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        listen: ListenArgs,
    },
    /// Run the server with simulated devices and a webhook receiver, raising a gas alarm
    /// within a minute.
    Demo {
        #[command(flatten)]
        listen: ListenArgs,
        /// Address of the demo's own webhook receiver; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:0")]
        webhook_listen: SocketAddr,
    },
    /// Check a config file and print every problem; exits with 0 only for a valid file.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Work with device profiles.
    Profiles {
        #[command(subcommand)]
        command: ProfilesCommand,
    },
    /// Read a password from standard input (one line) and print its argon2id PHC hash, for
    /// `mqtt_password_hash` and `[[mqtt_users]] password_hash`.
    HashPassword,
    /// Print a new random API token and the SHA-256 for its `[[api_tokens]] token_sha256`.
    GenerateToken,
    /// Read an API token from standard input (one line) and print its SHA-256.
    HashToken,
}

#[derive(Debug, Subcommand)]
enum ProfilesCommand {
    /// Check every profile in a directory and print every problem.
    Check {
        /// Directory of profile files.
        #[arg(default_value = "device-profiles")]
        dir: PathBuf,
    },
}

/// Flags that override the config file; each also reads an environment variable.
#[derive(Debug, Args)]
struct ListenArgs {
    /// HTTP API address, such as 127.0.0.1:8080; port 0 picks a free port.
    #[arg(long, env = "STONELION_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// MQTT broker address, such as 127.0.0.1:1883; port 0 picks a free port.
    #[arg(long, env = "STONELION_MQTT_LISTEN")]
    mqtt_listen: Option<SocketAddr>,
    /// Directory for time series, alarms and the webhook queue.
    #[arg(long, env = "STONELION_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl ListenArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            http_listen: self.http_listen,
            mqtt_listen: self.mqtt_listen,
            data_dir: self.data_dir.clone(),
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::logging::init();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Profiles {
            command: ProfilesCommand::Check { dir },
        } => check_profiles(&dir),
        Command::HashPassword => hash_password(),
        Command::GenerateToken => {
            let token = crate::security::tokens::generate_token();
            println!("token:        {token}");
            println!(
                "token_sha256: {}",
                hex::encode(crate::security::tokens::token_digest(&token))
            );
            ExitCode::SUCCESS
        }
        Command::HashToken => match read_secret_line() {
            Ok(token) => {
                println!(
                    "{}",
                    hex::encode(crate::security::tokens::token_digest(&token))
                );
                ExitCode::SUCCESS
            }
            Err(message) => fail(&message),
        },
        Command::Run { config, listen } => run_async(async move {
            let server = match config {
                Some(path) => {
                    let file = ConfigFile {
                        path,
                        overrides: listen.overrides(),
                    };
                    Server::start_with_file(file, Arc::new(SystemClock)).await?
                }
                None => {
                    let mut config = config::parse("", builtin_profiles()).map_err(|problems| {
                        config::ConfigError {
                            source_name: "built-in defaults".to_owned(),
                            problems,
                        }
                    })?;
                    listen.overrides().apply(&mut config.server);
                    Server::start(config, Arc::new(SystemClock)).await?
                }
            };
            serve_until_stopped(server).await
        }),
        Command::Demo {
            listen,
            webhook_listen,
        } => run_async(async move { crate::demo::run(listen.overrides(), webhook_listen).await }),
    }
}

fn run_async(job: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(job) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a server until SIGTERM or Ctrl-C, then shuts it down in order.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let server = Server::start(config, Arc::new(SystemClock)).await?;
    serve_until_stopped(server).await
}

/// Prints the listening addresses, reloads the config on SIGHUP, and shuts the server down
/// in order on SIGTERM or Ctrl-C. The signal handlers are installed before the addresses
/// are printed, so a supervisor that signals as soon as it reads them is handled.
async fn serve_until_stopped(server: Server) -> anyhow::Result<()> {
    let stop = stop_signal();
    let reload_on_hangup = tokio::spawn(reload_on_sighup(hangup_signal(), server.reloader.clone()));
    match server.mqtt_tls_addr {
        Some(tls) => println!(
            "stonelion listening: http={} mqtt={} mqtt_tls={tls}",
            server.http_addr, server.mqtt_addr
        ),
        None => println!(
            "stonelion listening: http={} mqtt={}",
            server.http_addr, server.mqtt_addr
        ),
    }
    stop.await;
    reload_on_hangup.abort();
    server.shutdown().await;
    Ok(())
}

#[cfg(unix)]
type HangupSignal = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type HangupSignal = Option<()>;

/// Installs the SIGHUP handler.
fn hangup_signal() -> HangupSignal {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /api/v1/admin/reload");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Reloads the config on every SIGHUP, logging what changed or every problem found.
async fn reload_on_sighup(hangup: HangupSignal, reloader: Arc<crate::reload::Reloader>) {
    #[cfg(unix)]
    {
        let Some(mut hangup) = hangup else { return };
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP received; reloading the config");
            match reloader.reload().await {
                Ok(_) => {}
                Err(crate::reload::AdminError::Invalid(problems)) => {
                    for problem in &problems {
                        tracing::error!(problem = %problem, "config reload rejected; the running config stays");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "config reload failed; the running config stays");
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (hangup, reloader);
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn wait_for_signal() {
    stop_signal().await;
}

/// Installs the SIGTERM handler now and returns a future that ends on Ctrl-C or SIGTERM.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match term {
                Ok(term) => term,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM; stop the server with Ctrl-C");
                    let _ = ctrl_c.await;
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    }
}

/// Checks a config file as `run` does: the file with the managed devices of its data
/// directory, then the listeners that `run` rejects, and prints every problem.
fn check_config(path: &Path) -> ExitCode {
    let file = ConfigFile {
        path: path.to_owned(),
        overrides: Overrides::default(),
    };
    let file_name = path.display().to_string();
    let mut problems = match config::managed::load(&file) {
        Ok(loaded) => {
            let mut problems = config::check_start(&loaded.file_text, Some(&loaded.config));
            problems.extend(config::file_problems(&loaded.file_text, &loaded.config));
            let config = &loaded.config;
            // Printed with problems too, so that one run shows everything to fix.
            for problem in config::file_warnings(&loaded.file_text, config) {
                println!(
                    "{file_name}:{}: {}: warning: {}",
                    problem.line, problem.key, problem.message
                );
            }
            if problems.is_empty() {
                println!(
                    "{file_name}: valid ({} sites, {} devices, {} webhooks)",
                    config.sites.len(),
                    config.devices.len(),
                    config.webhooks.len()
                );
                return ExitCode::SUCCESS;
            }
            config::managed::in_file(&file_name, problems)
        }
        Err(mut problems) => {
            // Report the listeners that `run` would reject in the same run as the rest.
            if let Ok(text) =
                crate::files::read_text_limited(path, crate::files::MAX_CONFIG_FILE_BYTES)
            {
                problems.extend(config::managed::in_file(
                    &file_name,
                    config::check_start(&text, None),
                ));
            }
            problems
        }
    };
    // The config file's problems first, in line order, then the managed devices file's.
    problems.sort_by_key(|p| (p.file != file_name, p.problem.line));
    for config::managed::FileProblem { file, problem } in &problems {
        let place = if problem.line == 0 {
            String::new()
        } else {
            format!("{}:", problem.line)
        };
        let key = if problem.key.is_empty() {
            String::new()
        } else {
            format!(" {}:", problem.key)
        };
        println!("{file}:{place}{key} {}", problem.message);
    }
    println!("{}: {} problem(s) found", path.display(), problems.len());
    ExitCode::FAILURE
}

fn hash_password() -> ExitCode {
    let password = match read_secret_line() {
        Ok(password) => password,
        Err(message) => return fail(&message),
    };
    match crate::security::hash_password(&password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("hashing the password failed: {e}")),
    }
}

/// Reads one line from standard input without its line ending; an empty line is an error.
fn read_secret_line() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read standard input: {e}"))?;
    let secret = line.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err("standard input is empty; pipe the secret in, such as `read -rs P; echo \"$P\" | stonelion hash-password`".to_owned());
    }
    Ok(secret.to_owned())
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn check_profiles(dir: &Path) -> ExitCode {
    let problems = crate::profile::check::check_dir(dir);
    if problems.is_empty() {
        println!("{}: all profiles are valid", dir.display());
        ExitCode::SUCCESS
    } else {
        for problem in &problems {
            println!("{problem}");
        }
        println!("{}: {} problem(s) found", dir.display(), problems.len());
        ExitCode::FAILURE
    }
}
