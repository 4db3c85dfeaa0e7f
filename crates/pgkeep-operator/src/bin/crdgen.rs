//! Writes the CRDs of `pgkeep.dev` as YAML, one document per kind, to
//! stdout or to the directory given (`deploy/crds/`). A test fails when
//! the committed files differ from what this prints.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let docs = pgkeep_operator::crd::yaml();
    match std::env::args().nth(1) {
        None => {
            for (_, text) in docs {
                print!("---\n{text}");
            }
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            for (file, text) in docs {
                std::fs::write(Path::new(&dir).join(file), text)?;
            }
        }
    }
    Ok(())
}
