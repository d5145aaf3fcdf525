//! `hj212-gateway`: see `hj212-gateway --help` and the README.

fn main() -> std::process::ExitCode {
    hj212_gateway::cli::main()
}
