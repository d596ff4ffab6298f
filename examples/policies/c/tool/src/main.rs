//! `vmb-c-tool bindings WIT_DIR OUT_DIR` writes `policy.h` and `policy.c`
//! for the `policy` world;
//! `vmb-c-tool component WIT_DIR CORE.wasm OUT.wasm` embeds the world's type
//! information in a core module and encodes it as a component, refusing a
//! module that imports anything but the world's `log`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use wit_bindgen_core::Files;
use wit_component::{ComponentEncoder, StringEncoding};
use wit_parser::{Resolve, WorldId};

fn world(wit: &Path) -> Result<(Resolve, WorldId)> {
    let mut resolve = Resolve::default();
    let (pkg, _) = resolve.push_dir(wit).with_context(|| format!("cannot read WIT from {}", wit.display()))?;
    let world = resolve.select_world(&[pkg], Some("policy")).context("no `policy` world")?;
    Ok((resolve, world))
}

fn bindings(wit: &Path, out: &Path) -> Result<()> {
    let (mut resolve, world) = world(wit)?;
    let mut files = Files::default();
    let mut generator = wit_bindgen_c::Opts::default().build();
    generator.generate(&mut resolve, world, &mut files)?;
    std::fs::create_dir_all(out)?;
    for (name, bytes) in files.iter() {
        // policy.c, policy.h and policy_component_type.o (a wasm object
        // carrying the world's type information, linked in by clang).
        std::fs::write(out.join(name), bytes).with_context(|| format!("cannot write {name}"))?;
    }
    Ok(())
}

fn component(wit: &Path, core: &Path, out: &Path) -> Result<()> {
    let (resolve, world) = world(wit)?;
    let mut module = std::fs::read(core).with_context(|| format!("cannot read {}", core.display()))?;
    for payload in wasmparser_imports(&module)? {
        bail!("{} imports `{payload}`: a policy may import only `log` (was snprintf or stdio used?)", core.display());
    }
    wit_component::embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8)?;
    let component = ComponentEncoder::default().module(&module)?.validate(true).encode()?;
    std::fs::write(out, component).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// Imports of the core module other than the world's own `$root.log`.
fn wasmparser_imports(module: &[u8]) -> Result<Vec<String>> {
    let mut foreign = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        if let wasmparser::Payload::ImportSection(reader) = payload? {
            for import in reader.into_imports() {
                let import = import?;
                if !(import.module == "$root" && import.name == "log") {
                    foreign.push(format!("{}::{}", import.module, import.name));
                }
            }
        }
    }
    Ok(foreign)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["bindings", wit, out] => bindings(Path::new(wit), Path::new(out)),
        ["component", wit, core, out] => component(Path::new(wit), Path::new(core), Path::new(out)),
        _ => bail!("usage: vmb-c-tool bindings WIT_DIR OUT_DIR | component WIT_DIR CORE.wasm OUT.wasm"),
    }
}
