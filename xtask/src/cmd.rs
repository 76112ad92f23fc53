//! Running commands in the open: every command is printed before it runs, and a failure
//! names the command and how it ended.
//!
//! Owns: `say` (the `xtask:` lines), `run`, `run_tee` (stream and capture), `exec`.
//! Must not: decide what to run.
use std::{
    env,
    ffi::OsStr,
    io::{self, Read, Write},
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, ExitStatus, Stdio},
    thread,
};

use anyhow::{bail, Context, Result};

/// Prints one `xtask: …` line on stderr (stdout stays free for the commands' output).
pub fn say(msg: impl std::fmt::Display) {
    eprintln!("xtask: {msg}");
}

/// Runs `cmd` with inherited stdio; fails with the command line and its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    say(format!("$ {line}"));
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    check(&line, status)
}

/// Runs `cmd`, copying its stdout and stderr to ours as they arrive, and returns its exit
/// status together with everything it printed (stdout then stderr, lossily decoded).
pub fn run_tee(cmd: &mut Command) -> Result<(ExitStatus, String)> {
    let line = display(cmd);
    say(format!("$ {line}"));
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    let out = child.stdout.take().expect("stdout is piped");
    let err = child.stderr.take().expect("stderr is piped");
    let out = thread::spawn(move || tee(out, io::stdout()));
    let err = thread::spawn(move || tee(err, io::stderr()));
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    let mut captured = out.join().expect("stdout copier panicked")?;
    captured.extend(err.join().expect("stderr copier panicked")?);
    Ok((status, String::from_utf8_lossy(&captured).into_owned()))
}

/// Replaces this process with `cmd` (stdio, signals and the exit code are then its own).
/// Returns only if the exec failed.
pub fn exec(cmd: &mut Command) -> anyhow::Error {
    let line = display(cmd);
    say(format!("$ exec {line}"));
    let err = cmd.exec();
    anyhow::Error::new(err).context(format!("could not run `{line}`"))
}

/// Fails with the command line unless `status` is success.
pub fn check(line: &str, status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("`{line}` failed ({status})")
    }
}

/// Runs `cmd` quietly and returns its stdout if it succeeded (for probes, not for work).
pub fn probe(cmd: &mut Command) -> Option<String> {
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Like `probe`, but keeps the stdout of a failed command too (`dpkg-query` exits 1 when
/// one of several packages is unknown and still reports the others).
pub fn probe_stdout(cmd: &mut Command) -> Option<String> {
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn tee(mut from: impl Read, mut to: impl Write) -> io::Result<Vec<u8>> {
    let mut captured = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(captured),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        captured.extend_from_slice(&buf[..n]);
        // A closed terminal must not stop the command or lose the capture.
        let _ = to.write_all(&buf[..n]).and_then(|()| to.flush());
    }
}

/// The command as a shell line: explicitly set variables first (`PATH=/x:$PATH` when a
/// variable only gained a prefix), then the program and its arguments, quoted where needed.
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        let Some(value) = value else { continue };
        let key = key.to_string_lossy();
        let value = value.to_string_lossy();
        let shown = match env::var(&*key) {
            Ok(old) if !old.is_empty() && value.len() > old.len() && value.ends_with(&old) => {
                format!("{}${key}", quote(&value[..value.len() - old.len()]))
            }
            _ => quote(&value),
        };
        parts.push(format!("{key}={shown}"));
    }
    if let Some(dir) = cmd.get_current_dir() {
        if dir != env::current_dir().unwrap_or_default() {
            parts.insert(0, format!("(cd {} &&", quote_os(dir.as_os_str())));
        }
    }
    parts.push(quote_os(short_program(cmd.get_program())));
    parts.extend(cmd.get_args().map(quote_os));
    let mut line = parts.join(" ");
    if line.starts_with("(cd ") {
        line.push(')');
    }
    line
}

/// `/root/.cargo/bin/cargo` reads better as `cargo`.
fn short_program(program: &OsStr) -> &OsStr {
    let path = Path::new(program);
    match path.file_name() {
        Some(name) if name == "cargo" => name,
        _ => program,
    }
}

fn quote_os(s: &OsStr) -> String {
    quote(&s.to_string_lossy())
}

fn quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,+@%^".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_a_path_prefix_as_such_and_quotes_what_needs_it() {
        let path = env::var("PATH").unwrap_or_default();
        if path.is_empty() {
            return;
        }
        let mut c = Command::new("/root/.cargo/bin/cargo");
        c.env("PATH", format!("/usr/lib/llvm-22/bin:{path}"))
            .args(["install", "a b", "it's"]);
        assert_eq!(
            display(&c),
            r"PATH=/usr/lib/llvm-22/bin:$PATH cargo install 'a b' 'it'\''s'"
        );
    }
}
