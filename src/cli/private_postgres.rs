//! A private PostgreSQL for a machine that has none running: made with `initdb` from the
//! installed server binaries in a data directory of its own, started and stopped with
//! `pg_ctl` (as the `postgres` user when Switchyard runs as root, since PostgreSQL refuses
//! root).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use tokio::process::Command;
use tracing::{info, warn};

use crate::cli::bootstrap::DEFAULT_ADDR;

/// Unix socket paths longer than this are refused by the kernel (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 100;

/// A PostgreSQL server this process started in its own data directory.
pub struct PrivatePostgres {
    data_dir: PathBuf,
    pg_ctl: PathBuf,
    /// PostgreSQL refuses to run as root, so as root every server command runs as this user.
    run_as: Option<String>,
}

impl PrivatePostgres {
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    async fn is_running(&self) -> bool {
        let args = [
            "-D".to_string(),
            path_arg(&self.data_dir),
            "status".to_string(),
        ];
        run_program(self.run_as.as_deref(), &self.pg_ctl, &args)
            .await
            .is_ok_and(|out| out.status.success())
    }

    /// Stops the server (fast shutdown: open sessions are ended, nothing committed is lost).
    pub async fn stop(&self) {
        let args = vec![
            "-D".to_string(),
            path_arg(&self.data_dir),
            "-m".to_string(),
            "fast".to_string(),
            "-w".to_string(),
            "stop".to_string(),
        ];
        match run_program(self.run_as.as_deref(), &self.pg_ctl, &args).await {
            Ok(out) if out.status.success() => {
                info!(data_dir = %self.data_dir.display(), "stopped the private PostgreSQL")
            }
            Ok(out) => warn!(
                data_dir = %self.data_dir.display(),
                output = %output_tail(&out),
                "could not stop the private PostgreSQL"
            ),
            Err(e) => warn!(
                data_dir = %self.data_dir.display(),
                error = %e,
                "could not stop the private PostgreSQL"
            ),
        }
    }
}

/// Starts (or finds running) the private server in `.switchyard/postgres`. Returns `None` when
/// it was already running: that one belongs to another Switchyard, which will stop it.
/// Starts (or reuses) a PostgreSQL server with default settings in `data_dir` on
/// 127.0.0.1:`port`, creating it with initdb first if needed. `None` when one was already
/// running there (it is not ours to stop). `why` is logged.
pub async fn start_private_in(
    mut data_dir: PathBuf,
    port: u16,
    why: &str,
) -> anyhow::Result<Option<PrivatePostgres>> {
    let (initdb, pg_ctl) = find_server_binaries().ok_or_else(|| {
        anyhow::anyhow!(
            "nothing answers at {DEFAULT_ADDR} and DATABASE_URL is not set, and no PostgreSQL \
             server binaries (initdb, pg_ctl) were found to start a private one: install \
             PostgreSQL (e.g. `apt-get install postgresql`) or set DATABASE_URL"
        )
    })?;
    let run_as = if is_root() {
        Some(postgres_user().await?)
    } else {
        None
    };
    let cwd = std::env::current_dir().context("reading the current directory")?;
    prepare_data_dir(&data_dir, run_as.as_deref()).await?;
    if let Some(user) = run_as.as_deref() {
        if !user_can_write(user, &data_dir).await {
            // e.g. a checkout under /root, which the postgres user cannot enter.
            let fallback = std::env::temp_dir().join(format!(
                "switchyard-postgres-{:016x}",
                fnv1a(cwd.as_os_str().as_encoded_bytes())
            ));
            warn!(
                wanted = %data_dir.display(),
                using = %fallback.display(),
                user,
                "the {user} user cannot write the private PostgreSQL's data directory here; using a temporary one"
            );
            data_dir = fallback;
            prepare_data_dir(&data_dir, run_as.as_deref()).await?;
        }
    }
    let server = PrivatePostgres {
        data_dir,
        pg_ctl,
        run_as,
    };
    // Two Switchyards starting together in one directory take turns; the second reuses.
    let _lock = lock_file(server.data_dir.with_extension("lock")).await?;
    let dir = path_arg(&server.data_dir);
    let user = server.run_as.as_deref();

    if !server.data_dir.join("PG_VERSION").exists() {
        let args: Vec<String> = [
            "-D",
            &dir,
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
        ]
        .map(String::from)
        .into();
        let out = run_program(user, &initdb, &args).await?;
        if !out.status.success() {
            bail!(
                "initdb {} failed: {}",
                server.data_dir.display(),
                output_tail(&out)
            );
        }
    }

    let reuse = |server: &PrivatePostgres| {
        info!(
            data_dir = %server.data_dir.display(),
            "using the private PostgreSQL already running on 127.0.0.1:{port}, because {why}"
        );
        Ok(None)
    };
    if server.is_running().await {
        return reuse(&server);
    }

    let socket_name = format!(".s.PGSQL.{port}");
    let socket_dir = if server.data_dir.as_os_str().len() + socket_name.len() < MAX_SOCKET_PATH {
        dir.clone()
    } else {
        path_arg(&std::env::temp_dir())
    };
    let log = path_arg(&server.data_dir.join("server.log"));
    // pg_ctl hands -o to a shell, hence the inner quoting.
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -k {}",
        shell_quote(&socket_dir)
    );
    let args: Vec<String> = [
        "-D", &dir, "-l", &log, "-w", "-t", "60", "-o", &options, "start",
    ]
    .map(String::from)
    .into();
    let out = run_program(user, &server.pg_ctl, &args).await?;
    if !out.status.success() {
        // Another Switchyard in this directory may have started it a moment ago.
        if server.is_running().await {
            return reuse(&server);
        }
        let server_log = std::fs::read_to_string(server.data_dir.join("server.log"))
            .map(|s| tail(&s, 1500))
            .unwrap_or_default();
        bail!(
            "could not start a private PostgreSQL in {} (is port {port} taken?): {}\n{}",
            server.data_dir.display(),
            output_tail(&out),
            server_log
        );
    }
    info!(
        data_dir = %server.data_dir.display(),
        log = %log,
        "started a private PostgreSQL on 127.0.0.1:{port}, because {why}; it stops when its owner exits"
    );
    Ok(Some(server))
}

/// Holds an exclusive lock on `path` until the returned file is dropped.
async fn lock_file(path: PathBuf) -> anyhow::Result<std::fs::File> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(file)
    })
    .await?
}

async fn prepare_data_dir(dir: &Path, run_as: Option<&str>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(user) = run_as {
        let out = Command::new("chown")
            .arg("-R")
            .arg(user)
            .arg(dir)
            .output()
            .await
            .context("running chown")?;
        if !out.status.success() {
            bail!(
                "chown {user} {} failed: {}",
                dir.display(),
                output_tail(&out)
            );
        }
    }
    Ok(())
}

async fn user_can_write(user: &str, dir: &Path) -> bool {
    let test = PathBuf::from("test");
    let args = vec!["-w".to_string(), path_arg(dir)];
    run_program(Some(user), &test, &args)
        .await
        .is_ok_and(|out| out.status.success())
}

/// The user a root process runs the server as: `postgres`, which the OS packages create.
async fn postgres_user() -> anyhow::Result<String> {
    let exists = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .await
        .is_ok_and(|out| out.status.success());
    if !exists {
        bail!(
            "running as root, PostgreSQL will not run as root, and there is no `postgres` user to \
             run a private one as: install PostgreSQL from the OS packages (which creates it) \
             or set DATABASE_URL"
        );
    }
    Ok("postgres".to_string())
}

/// Runs `program args` directly, or as `user` through `su` (present on every Linux).
async fn run_program(
    user: Option<&str>,
    program: &Path,
    args: &[String],
) -> anyhow::Result<std::process::Output> {
    let mut command = match user {
        Some(user) => {
            let mut c = Command::new("su");
            c.args([user, "-s", "/bin/sh", "-c", &shell_command(program, args)]);
            c
        }
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    };
    // The server user may not be allowed into our working directory.
    command.current_dir("/").stdin(std::process::Stdio::null());
    command
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))
}

/// The newest `/usr/lib/postgresql/*/bin` (Debian, Ubuntu), else `initdb` and `pg_ctl` on PATH.
fn find_server_binaries() -> Option<(PathBuf, PathBuf)> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let bin = entry.path().join("bin");
            let version = parse_version(entry.file_name().to_str()?)?;
            (is_executable(&bin.join("initdb")) && is_executable(&bin.join("pg_ctl")))
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some((bin.join("initdb"), bin.join("pg_ctl")));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|dir| {
        let (initdb, pg_ctl) = (dir.join("initdb"), dir.join("pg_ctl"));
        (is_executable(&initdb) && is_executable(&pg_ctl)).then_some((initdb, pg_ctl))
    })
}

fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_uid(&status))
        .or_else(|| {
            let out = std::process::Command::new("id").arg("-u").output().ok()?;
            String::from_utf8(out.stdout).ok()?.trim().parse().ok()
        })
        == Some(0)
}

/// The effective uid from `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn shell_command(program: &Path, args: &[String]) -> String {
    std::iter::once(path_arg(program))
        .chain(args.iter().cloned())
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn output_tail(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    tail(text.trim(), 1500)
}

fn tail(s: &str, max: usize) -> String {
    let start = s.len().saturating_sub(max);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// A stable hash, so the fallback data directory is the same on every run from one checkout.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_shell_words() {
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(
            shell_command(
                Path::new("/bin/pg_ctl"),
                &["-o".into(), "-p 1 -k '/x'".into()]
            ),
            r"'/bin/pg_ctl' '-o' '-p 1 -k '\''/x'\'''"
        );
    }

    #[test]
    fn reads_effective_uid() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn orders_versions_numerically() {
        let mut v = [
            parse_version("9.6").unwrap(),
            parse_version("16").unwrap(),
            parse_version("15").unwrap(),
        ];
        v.sort();
        assert_eq!(v.last(), Some(&vec![16]));
        assert_eq!(parse_version("main"), None);
    }

    #[test]
    fn tails_on_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }
}
