//! The `reneg` command line: parses arguments, calls the library, prints. Errors are printed
//! on one line; bad input exits with code 2, internal failures with 1.

mod cli;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "reneg",
    version,
    about = "Negative embeddings for Stable Diffusion, learned with reward guidance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Text-to-image with classifier-free guidance and a null-text, prompt or learned negative.
    Generate(Box<cli::generate::GenerateArgs>),
    /// Negative-embedding files: import, export, inspect, encode.
    #[command(subcommand)]
    Embedding(cli::embedding::EmbeddingCommand),
    /// Score images with a reward model (HPSv2, PickScore, LAION aesthetic, CLIP score).
    Score(cli::score::ScoreArgs),
    /// Learn a global negative embedding by reward feedback (ReNeg).
    Train(Box<cli::train::TrainArgs>),
    /// Compare negatives side by side: images, scores by every reward, report (and `eval merge`).
    Eval(Box<cli::eval::EvalCommand>),
    /// The miniature world: train its models from scratch, run the ReNeg experiment in it.
    #[command(subcommand)]
    Mini(cli::mini::MiniCommand),
}

/// clap's errors in one line (their first paragraph, which names the flag; usage and hints
/// dropped), exit code 2; `--help` and `--version` print as clap prints them.
fn parse_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(if e.use_stderr() { 2 } else { 0 })
        }
        _ => {
            // The error's first paragraph (for a missing argument, the list of what is missing).
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .skip_while(|l| l.trim().is_empty())
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{} (see --help)", first.join(" "));
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    reneg::runtime::keep_freed_memory();
    let command = Cli::command().mut_subcommand("train", cli::train::document_defaults);
    let cli = match command
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => return parse_error(e),
    };
    if let Command::Mini(cmd) = &cli.command {
        if let Some(n) = cli::mini::threads(cmd) {
            // Before any thread starts: candle and the worker pool read it.
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
    reneg::runtime::fix_thread_count();
    if let Err(e) = reneg::nn::dispatch::check_env() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let result = reneg::runtime::run_on_workers(move || match cli.command {
        Command::Generate(args) => cli::generate::run(*args),
        Command::Embedding(cmd) => cli::embedding::run(cmd),
        Command::Score(args) => cli::score::run(args),
        Command::Train(args) => cli::train::run(*args),
        Command::Eval(args) => cli::eval::run(*args),
        Command::Mini(cmd) => cli::mini::run(cmd),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the messages hold (a TOML error spans lines, for one).
            let chain: Vec<String> = e
                .chain()
                .map(|c| {
                    c.to_string()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            eprintln!("error: {}", chain.join(": "));
            if cli::is_user_error(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
