//! Every `vae ...` command in the README, docs/ and the shipped configs' comments pastes into
//! bash and zsh alike: each is run through the shell as `printf '%s\0' ARGS` in an empty folder
//! (bash with `failglob`, so an unquoted `[32,32]` fails as zsh's `no matches found` does; zsh
//! itself too where it is installed, its words compared with bash's), and each `vae train`'s
//! `--set` values, as the shell passed them, must give a config that `vae` accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The command lines of a Markdown text: lines of indented (4 spaces) or fenced code blocks and
/// inline `vae ...` spans of its prose (synopses aside), and of a TOML file's comments
/// (`#   vae ...`), continuation lines (`\`) joined, whose command (after any `VAR=value`
/// assignments) is `vae`. Returns (line number, text).
fn commands(text: &str, toml: bool) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        if raw.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let code = if toml {
            raw.trim_start().strip_prefix('#').map(str::trim)
        } else if fenced {
            Some(raw.trim())
        } else {
            raw.strip_prefix("    ").map(str::trim)
        };
        let Some(code) = code else {
            pending = None;
            // Prose: its inline `vae ...` spans, but not a synopsis (`[--flag X]`, `a \| b`).
            if !toml {
                let mut parts = raw.split('`');
                parts.next();
                // A span that does not close on its line runs on past it: not taken.
                while let (Some(span), Some(_)) = (parts.next(), parts.next()) {
                    if span.starts_with("vae ") && !span.contains("[-") && !span.contains('|') {
                        out.push((i + 1, span.to_string()));
                    }
                }
            }
            continue;
        };
        let (n, mut line) = match pending.take() {
            Some((n, l)) => (n, l + " " + code),
            None => (i + 1, code.to_string()),
        };
        if line.ends_with('\\') {
            line.pop();
            pending = Some((n, line));
            continue;
        }
        if args_after_vae(&line).is_some() {
            out.push((n, line));
        }
    }
    out
}

/// The text after the command word `vae` (or `target/release/vae`), past leading `VAR=value`
/// assignments; None when the line runs another command.
fn args_after_vae(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    loop {
        let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let word = &rest[..word_end];
        if word == "vae" || word == "target/release/vae" {
            return Some(&rest[word_end..]);
        }
        let is_assignment = word.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        });
        if !is_assignment {
            return None;
        }
        rest = rest[word_end..].trim_start();
    }
}

/// The words `shell` passes to `vae` for `args`, run in the empty folder `dir`; Err with the
/// shell's message when the line fails there (an unmatched glob, an unclosed quote).
fn words(shell: &[&str], args: &str, dir: &Path) -> Result<Vec<String>, String> {
    let script = format!("printf '%s\\0' {args}");
    let o = Command::new(shell[0])
        .args(&shell[1..])
        .arg(&script)
        .current_dir(dir)
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&o.stdout)
        .split('\0')
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect())
}

const BASH: &[&str] = &["bash", "--norc", "--noprofile", "-O", "failglob", "-c"];
const ZSH: &[&str] = &["zsh", "-f", "-c"];

fn has_zsh() -> bool {
    Command::new("zsh")
        .args(["-f", "-c", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Checks one command line; Err says what is wrong with it.
fn check(line: &str, zsh: bool, dir: &Path) -> Result<(), String> {
    let args = args_after_vae(line).ok_or("not a vae command")?;
    // History expansion (interactive bash and zsh) acts on `!` even inside double quotes.
    if args.contains('!') {
        return Err("a `!` (history expansion in an interactive shell)".into());
    }
    let b = words(BASH, args, dir).map_err(|e| format!("bash: {e}"))?;
    if zsh {
        let z = words(ZSH, args, dir).map_err(|e| format!("zsh: {e}"))?;
        if z != b {
            return Err(format!("bash passes {b:?}, zsh {z:?}"));
        }
    }
    // `vae train`'s `--set` pairs, as the shell passed them, must resolve (the config named by
    // --config, else the reference recipe).
    if b.first().map(String::as_str) == Some("train") && !b.iter().any(|w| w == "--resume") {
        let mut sets = Vec::new();
        let mut config = "mnist.toml".to_string();
        let mut it = b.iter();
        while let Some(w) = it.next() {
            match w.as_str() {
                "--set" => sets.extend(it.next().cloned()),
                "--config" | "-c" => config = it.next().cloned().unwrap_or_default(),
                _ => {}
            }
        }
        // A placeholder (`--config CONFIG` in prose) names no file to resolve against.
        if config.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            return Ok(());
        }
        let source = vae::config::find(&config).map_err(|e| format!("{e:#}"))?;
        vae::config::resolve(&source, &sets).map_err(|e| format!("{e:#}"))?;
    }
    Ok(())
}

/// The Markdown files and shipped configs whose commands a user pastes.
fn documents() -> Vec<(PathBuf, bool)> {
    let mut out = vec![(root().join("README.md"), false)];
    for dir in ["docs", "configs"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for p in files {
            match p.extension().and_then(|e| e.to_str()) {
                Some("md") => out.push((p, false)),
                Some("toml") => out.push((p, true)),
                _ => {}
            }
        }
    }
    out
}

#[test]
fn every_documented_command_pastes_into_bash_and_zsh() {
    let zsh = has_zsh();
    if !zsh {
        eprintln!("zsh not installed: checking with bash's failglob alone (apt-get install zsh to compare too)");
    }
    let dir = tempfile::tempdir().unwrap();
    // config::find looks for configs/ in the working directory; this test's is the crate root.
    let mut checked = 0;
    let mut bad = Vec::new();
    for (path, toml) in documents() {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.strip_prefix(root()).unwrap().display().to_string();
        for (n, line) in commands(&text, toml) {
            checked += 1;
            if let Err(e) = check(&line, zsh, dir.path()) {
                bad.push(format!("{name}:{n}: {line}\n    {e}"));
            }
        }
    }
    assert!(
        checked > 40,
        "found only {checked} commands: is the extraction broken?"
    );
    assert!(
        bad.is_empty(),
        "commands that do not paste:\n{}",
        bad.join("\n")
    );
}

/// Every `-o FILE` of a README command that writes into the current folder is ignored by git,
/// so a clone's `git status` stays clean after a newcomer follows the page.
#[test]
fn what_the_readme_commands_write_is_ignored_by_git() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let ignore = std::fs::read_to_string(root().join(".gitignore")).unwrap();
    let patterns: Vec<&str> = ignore.lines().map(str::trim).collect();
    let mut outputs = 0;
    // Every line, not only the code blocks: the commands table names outputs too.
    for (n, line) in readme
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.replace('`', " ")))
    {
        let w: Vec<&str> = line.split_whitespace().collect();
        for pair in w.windows(2) {
            let name = pair[1].trim_end_matches(|c: char| !c.is_alphanumeric());
            if pair[0] != "-o" || name.contains('/') || !name.contains('.') {
                continue;
            }
            outputs += 1;
            let ext = name.rsplit('.').next().unwrap();
            assert!(
                patterns.contains(&format!("/*.{ext}").as_str()),
                "README.md:{n}: `-o {name}` writes into the clone's root, which .gitignore does not cover"
            );
        }
    }
    assert!(outputs >= 7, "found {outputs} outputs");
}

/// The checker catches what it is for: an unquoted bracket, an unclosed quote, a `--set` value
/// the config refuses; and lets the quoted forms through.
#[test]
fn the_checker_catches_unquoted_brackets_and_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    let zsh = has_zsh();
    let c = |l: &str| check(l, zsh, dir.path());
    assert!(c("vae train --set data.resize=[32,32]").is_err());
    assert!(c("vae train --set 'data.resize=[32,32]'").is_ok());
    assert!(c("vae train --set 'model.arch=\"conv\"'").is_ok());
    // bash drops these quotes: the config gets `model.arch=conv`, which it takes as a string.
    assert!(c("vae train --set model.arch=\"conv\"").is_ok());
    assert!(
        c("vae train --set 'model.hidden=[400'").is_err(),
        "an unclosed list"
    );
    assert!(c("vae train --set 'train.epochs=ten'").is_err());
    assert!(
        c("vae sample --run 'runs/mnist").is_err(),
        "an unclosed quote"
    );
    assert!(c("vae sample -n 64 --scale 2 -o sample.png").is_ok());
    assert!(c("RAYON_NUM_THREADS=1 vae train --set train.epochs=1").is_ok());
    let found = commands(
        "text `vae sample -n 4` and `vae train [--config FILE]`\n\n    vae train --set a=1 \\\n      --set b=2\n    cargo test\n\n```\nvae eval\n```\n",
        false,
    );
    assert_eq!(
        found,
        vec![
            (1, "vae sample -n 4".to_string()),
            (3, "vae train --set a=1  --set b=2".to_string()),
            (8, "vae eval".to_string())
        ]
    );
    // A placeholder in angle brackets is a redirect to the shell.
    assert!(c("vae train --resume --run <copy>").is_err());
}
