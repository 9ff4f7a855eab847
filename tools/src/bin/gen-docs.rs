//! Writes the man pages and shell completions into OUTDIR
//! (tools/src/gen_docs.rs): `cargo run -p tools --bin gen-docs -- OUTDIR`.

use std::path::Path;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out] = args.as_slice() else {
        eprintln!("usage: gen-docs OUTDIR");
        return std::process::ExitCode::from(2);
    };
    match tools::gen_docs::generate(Path::new(out)) {
        Ok(g) => {
            for p in g.man.iter().chain(&g.completions) {
                println!("{}", p.display());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-docs: cannot write into {out}: {e}");
            std::process::ExitCode::from(8)
        }
    }
}
