//! `flanneld`: parse the command line, start logging, run. Wiring only.

use std::process::ExitCode;

use flannel_agent::{
    cli::{self, Command},
    daemon,
    host::{
        self,
        docker_opts::{self, DockerOptsArgs},
    },
    logging,
};

#[expect(
    clippy::print_stderr,
    clippy::print_stdout,
    reason = "the subcommands' output, errors before logging exists, and --version"
)]
fn main() -> ExitCode {
    let cmd = match cli::parse(std::env::args(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1));
        }
    };
    let result = match cmd {
        Command::Version => {
            // flannel prints its version to stderr.
            eprintln!("{}", cli::VERSION);
            Ok(())
        }
        Command::MkDockerOpts(args) => DockerOptsArgs::parse_args(&args)
            .and_then(|a| docker_opts::run(&a))
            .map_err(anyhow::Error::from),
        Command::Status(args) => host::status::run_client(&args)
            .map(|report| print!("{report}"))
            .map_err(anyhow::Error::from),
        Command::Run(flags) => {
            if let Err(e) = logging::init(&flags.log) {
                eprintln!("flanneld: {e}");
                return ExitCode::FAILURE;
            }
            // Logged, not printed: with --log_dir the error belongs in the log file.
            return match run(*flags) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "flanneld failed");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flanneld: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(flags: cli::Flags) -> anyhow::Result<()> {
    // Flags' Debug redacts the etcd password.
    tracing::info!(version = cli::VERSION, flags = ?flags, "starting flanneld");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(daemon::run(flags))?;
    Ok(())
}
