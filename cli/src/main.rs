//! `ferry`: parse the arguments, hand them and the environment to the library, exit.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = ferry_cli::Cli::parse();
    ferry_cli::main(cli, ferry_core::config::Env::from_process())
}
