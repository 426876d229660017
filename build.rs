//! Builds the web dashboard (`web/`: Preact, htm and xterm.js, bundled by
//! esbuild) into `$OUT_DIR/web`, where `host::dashboard` embeds it in the
//! binary: the host serves it with no files beside it and no CDN.
//!
//! The packages come from `npm ci` in `web/` (setup.sh runs it): a build
//! fetches nothing and writes nothing into the source tree, and it refuses
//! to bundle packages older than `web/package-lock.json` says.
//! `RIVERNODE_WEB_DIST` names a folder already built (`node web/build.mjs
//! DIR`) instead.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for watched in ["web/src", "web/build.mjs", "web/package-lock.json"] {
        println!("cargo:rerun-if-changed={watched}");
    }
    println!("cargo:rerun-if-env-changed=RIVERNODE_WEB_DIST");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("web");
    std::fs::create_dir_all(&out).expect("creating OUT_DIR/web");
    if let Some(dist) = std::env::var_os("RIVERNODE_WEB_DIST") {
        for file in ["index.html", "app.js", "app.css"] {
            let from = Path::new(&dist).join(file);
            println!("cargo:rerun-if-changed={}", from.display());
            if let Err(e) = std::fs::copy(&from, out.join(file)) {
                fail(&format!("RIVERNODE_WEB_DIST: {}: {e}", from.display()));
            }
        }
        return;
    }
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    // npm writes this file last in `npm ci`: older than the lock file means
    // the packages are not the ones it pins.
    let installed = web.join("node_modules/.package-lock.json");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (
        modified(&installed),
        modified(&web.join("package-lock.json")),
    ) {
        (None, _) => {
            fail("web/node_modules is missing: run `npm ci` in web/ (scripts/setup.sh does)")
        }
        // (npm writes both files at once on `npm install`: a second's slack.)
        (Some(i), Some(l)) if i + std::time::Duration::from_secs(1) < l => fail(
            "web/node_modules is older than web/package-lock.json: run `npm ci` in web/ \
             (scripts/setup.sh does)",
        ),
        _ => {}
    }
    run(
        Command::new("node")
            .arg("build.mjs")
            .arg(&out)
            .current_dir(&web),
        "node web/build.mjs",
    );
}

fn run(cmd: &mut Command, what: &str) {
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!("{what} failed ({s})")),
        Err(e) => fail(&format!(
            "{what}: {e}; the dashboard needs Node.js and npm to build \
             (`apt-get install nodejs npm`; setup.sh installs them)"
        )),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: building the web dashboard: {msg}");
    std::process::exit(1);
}
