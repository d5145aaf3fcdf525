//! The command line: global flags, one subcommand per job, and the dispatch.
//!
//! Each subcommand's flags, help text and `main` live with its implementation in
//! [`crate::cmd`]; the exit codes are one table in [`crate::exit`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cmd::{
    alarms, archive, backup, check_config, command, dead_letters, decode, exchanges, export, prove,
    replay, serve, sessions, simulate, stats, tail, verify,
};
use crate::telemetry::{self, LogFormat};

pub use crate::exit::{EX_CONFIG, EX_SOFTWARE};

/// HJ 212 ingestion gateway.
#[derive(Debug, Parser)]
#[command(name = "hj212-gateway", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "plain", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

// The help text of each subcommand is the doc comment of its flags struct.
#[derive(Debug, Subcommand)]
enum Command {
    Serve(serve::ServeFlags),
    CheckConfig(check_config::CheckConfigFlags),
    Decode(decode::DecodeFlags),
    Export(export::ExportFlags),
    Verify(verify::VerifyFlags),
    Replay(replay::ReplayFlags),
    Tail(tail::TailFlags),
    Simulate(simulate::SimulateArgs),
    Alarms(alarms::AlarmsFlags),
    Exchanges(exchanges::ExchangesFlags),
    DeadLetters(dead_letters::DeadLettersFlags),
    #[command(name = "command")]
    Ask(command::CommandFlags),
    Sessions(sessions::SessionsFlags),
    Stats(stats::StatsFlags),
    Prove(prove::ProveFlags),
    CheckProof(crate::cmd::check_proof::CheckProofFlags),
    Keygen(crate::cmd::keygen::KeygenFlags),
    Archive(archive::ArchiveFlags),
    Backup(backup::BackupFlags),
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(flags) => {
            // Only the daemon logs: what the other commands write to stdout and
            // stderr is their output.
            telemetry::init(cli.log_format);
            serve::main(flags)
        }
        Command::CheckConfig(flags) => check_config::main(flags),
        Command::Decode(flags) => decode::main(flags),
        Command::Export(flags) => export::main(flags),
        Command::Verify(flags) => verify::main(flags),
        Command::Replay(flags) => replay::main(flags),
        Command::Tail(flags) => tail::main(flags),
        Command::Simulate(args) => simulate::main(args),
        Command::Alarms(flags) => alarms::main(flags),
        Command::Exchanges(flags) => exchanges::main(flags),
        Command::DeadLetters(flags) => dead_letters::main(flags),
        Command::Ask(flags) => command::main(flags),
        Command::Sessions(flags) => sessions::main(flags),
        Command::Stats(flags) => stats::main(flags),
        Command::Prove(flags) => prove::main(flags),
        Command::CheckProof(flags) => crate::cmd::check_proof::main(flags),
        Command::Keygen(flags) => crate::cmd::keygen::main(flags),
        Command::Archive(flags) => archive::main(flags),
        Command::Backup(flags) => backup::main(flags),
    }
}
