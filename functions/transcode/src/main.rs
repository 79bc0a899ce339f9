//! The native entrypoint: the request JSON on stdin, the manifest JSON on stdout,
//! progress and errors on stderr (the last line says why when it fails).

use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        eprintln!("transcode: error: cannot read the input: {e}");
        return ExitCode::FAILURE;
    }
    match transcode::handle(&body) {
        Ok(manifest) => {
            let mut out = std::io::stdout().lock();
            if out
                .write_all(&manifest)
                .and_then(|()| out.write_all(b"\n"))
                .is_err()
            {
                eprintln!("transcode: error: cannot write the manifest to stdout");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("transcode: error: {}", transcode::one_line(&msg));
            ExitCode::FAILURE
        }
    }
}
