use clap::Parser;

fn main() {
    let cli = ambitctl::Cli::parse();
    // One thread is plenty: a handful of HTTP requests, mostly waiting.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ambitctl: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(ambitctl::run(cli)) {
        Ok(outcome) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            // A closed pipe (`ambitctl ... | head`) is not an error worth a message.
            let _ = out.write_all(outcome.stdout.as_bytes());
            let _ = out.flush();
            std::process::exit(outcome.code);
        }
        Err(e) => {
            eprintln!("ambitctl: {e:#}");
            std::process::exit(1);
        }
    }
}
