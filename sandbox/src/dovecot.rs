//! A private Dovecot IMAP server for the sandbox: a standalone configuration in the sandbox directory (nothing in
//! `/etc/dovecot` is used), listeners on 127.0.0.2 (STARTTLS and implicit TLS), XOAUTH2 and OAUTHBEARER checked by
//! the identity-provider emulator through Dovecot's oauth2 passdb (`use_grant_password`: one HTTP call per login,
//! the emulator decides), Maildir under `<mail root>/<mailbox>/Maildir`.
//!
//! Dovecot refuses to run its logins as root, so as root the whole instance runs as `nobody:nogroup` (through
//! `setpriv`); otherwise as the current user. The gotchas behind the settings are in the project notes
//! (G1 loopback counts as secure, G2 auth tarpit, G3 batched failures, G4 root, G5 fsync, G8 late reaping).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::{Gid, Group, Pid, Uid, User},
};
use tokio::{process::Child, sync::Mutex};

/// What to run when Dovecot is missing.
pub const INSTALL_HINT: &str = "apt-get install -y --no-install-recommends dovecot-imapd";

/// The address the mail listeners bind to: not 127.0.0.1, where Dovecot would treat every client as secured (G1).
pub const MAIL_HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Special-use folders every mailbox has, with Exchange Online's English names.
pub const SPECIAL_FOLDERS: [(&str, &str); 5] = [
    ("Sent Items", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Deleted Items", "\\Trash"),
    ("Junk Email", "\\Junk"),
    ("Archive", "\\Archive"),
];

/// The `dovecot` binary, or an error that says how to install it.
pub fn binary() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("dovecot"))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("Dovecot is not installed (no `dovecot` binary); install it with `{INSTALL_HINT}` (scripts/test does)")
        })
}

/// The user the Dovecot instance runs as: `nobody:nogroup` when we are root (Dovecot will not run logins as root),
/// else the current user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunUser {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub group: String,
    /// Whether the instance is started through `setpriv` as another user.
    pub switch: bool,
}

impl RunUser {
    pub fn detect() -> anyhow::Result<Self> {
        if Uid::effective().is_root() {
            let user = User::from_name("nobody")?
                .context("running as root, but there is no `nobody` user to run Dovecot as")?;
            let group = Group::from_name("nogroup")?
                .or(Group::from_name("nobody")?)
                .context("running as root, but there is no `nogroup` (or `nobody`) group to run Dovecot as")?;
            return Ok(Self {
                uid: user.uid.as_raw(),
                gid: group.gid.as_raw(),
                name: user.name,
                group: group.name,
                switch: true,
            });
        }
        let uid = Uid::effective();
        let gid = Gid::effective();
        let name = User::from_uid(uid)?.map_or_else(|| uid.to_string(), |u| u.name);
        let group = Group::from_gid(gid)?.map_or_else(|| gid.to_string(), |g| g.name);
        Ok(Self {
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            name,
            group,
            switch: false,
        })
    }

    /// Hands a path we created to the run user (a no-op when we are that user).
    pub fn own(&self, path: &Path) -> anyhow::Result<()> {
        if self.switch {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).with_context(|| {
                format!(
                    "cannot chown {} to {}:{}",
                    path.display(),
                    self.name,
                    self.group
                )
            })?;
        }
        Ok(())
    }

    /// Checks that the run user can reach `dir` (every ancestor searchable by others when we switch user).
    pub fn check_reachable(&self, dir: &Path) -> anyhow::Result<()> {
        if !self.switch {
            return Ok(());
        }
        for ancestor in dir.ancestors().skip(1) {
            let Ok(meta) = std::fs::metadata(ancestor) else {
                continue;
            };
            let mode = meta.permissions().mode();
            if mode & 0o001 == 0 {
                bail!(
                    "Dovecot runs as {} and cannot reach {}: {} has mode {:o} (not searchable by others); \
                     use a directory under /tmp, or `chmod o+x {}`",
                    self.name,
                    dir.display(),
                    ancestor.display(),
                    mode & 0o7777,
                    ancestor.display()
                );
            }
        }
        Ok(())
    }
}

/// Where and how to run the instance.
#[derive(Debug, Clone)]
pub struct DovecotOptions {
    /// Dovecot's own directory (configuration, sockets, state, log); created.
    pub dir: PathBuf,
    /// Mail root: mailbox `x@y` lives in `<mail_root>/x@y/Maildir` (lower case); created.
    pub mail_root: PathBuf,
    /// TLS certificate chain and key (PEM); copied into `dir` so that the run user can read them.
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    /// The emulator's Dovecot grant endpoint, e.g. `http://127.0.0.1:PORT/dovecot/grant`.
    pub grant_url: String,
    /// Fixed ports; `None` picks a free one.
    pub imap_port: Option<u16>,
    pub imaps_port: Option<u16>,
}

/// A running Dovecot instance. Stop it with [`Dovecot::stop`]; dropping it kills the master process.
pub struct Dovecot {
    child: Mutex<Option<Child>>,
    pid: u32,
    imap: SocketAddr,
    imaps: SocketAddr,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    base_dir: PathBuf,
    mail_root: PathBuf,
    instance: String,
    user: RunUser,
}

impl std::fmt::Debug for Dovecot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dovecot")
            .field("pid", &self.pid)
            .field("imap", &self.imap)
            .field("imaps", &self.imaps)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A free TCP port on `ip` (bound and released; Dovecot binds it right after).
pub fn free_port(ip: Ipv4Addr) -> anyhow::Result<u16> {
    let listener = TcpListener::bind((ip, 0))
        .with_context(|| format!("cannot bind {ip}:0 (is {ip} a loopback address here?)"))?;
    Ok(listener.local_addr()?.port())
}

impl Dovecot {
    /// Writes the configuration and starts `dovecot -F` as a child, then waits until both ports accept.
    ///
    /// The master gets SIGTERM when the thread that started it exits (`setpriv --pdeathsig`), so an instance never
    /// outlives its sandbox process: start it from a thread that lives as long as the sandbox.
    pub async fn start(opts: DovecotOptions) -> anyhow::Result<Self> {
        let fixed = opts.imap_port.is_some() && opts.imaps_port.is_some();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(&opts).await {
                // A free port chosen here can be taken by another process before Dovecot binds it.
                Err(e)
                    if !fixed
                        && attempt < 3
                        && format!("{e:#}").contains("Address already in use") =>
                {
                    tracing::warn!(
                        "a port chosen for Dovecot was taken meanwhile; retrying with others"
                    );
                }
                result => return result,
            }
        }
    }

    async fn start_once(opts: &DovecotOptions) -> anyhow::Result<Self> {
        let dovecot = binary()?;
        let user = RunUser::detect()?;
        user.check_reachable(&opts.dir)?;
        let imap_port = match opts.imap_port {
            Some(p) => p,
            None => free_port(MAIL_HOST)?,
        };
        let imaps_port = match opts.imaps_port {
            Some(p) => p,
            None => free_port(MAIL_HOST)?,
        };
        let files = Files::create(opts, &user)?;
        let instance = instance_name(&opts.dir);
        let config = Config {
            files: &files,
            mail_root: &opts.mail_root,
            instance: &instance,
            user: &user,
            imap_port,
            imaps_port,
        };
        write_file(&files.passdb, &passdb_config(&opts.grant_url), 0o644)?;
        write_file(&files.config, &config.render(), 0o644)?;

        let stderr = std::fs::File::create(&files.stderr)
            .with_context(|| format!("cannot create {}", files.stderr.display()))?;
        let mut command = match which("setpriv") {
            Some(setpriv) => {
                let mut c = tokio::process::Command::new(setpriv);
                if user.switch {
                    c.arg(format!("--reuid={}", user.uid))
                        .arg(format!("--regid={}", user.gid))
                        .arg("--clear-groups");
                }
                c.arg("--pdeathsig").arg("TERM").arg(&dovecot);
                c
            }
            None if user.switch => bail!(
                "running as root, Dovecot must be started as nobody through `setpriv` (util-linux), which is missing"
            ),
            None => tokio::process::Command::new(&dovecot),
        };
        command
            .arg("-F")
            .arg("-c")
            .arg(&files.config)
            .current_dir(&files.dir)
            .stdin(Stdio::null())
            .stdout(stderr.try_clone()?)
            .stderr(stderr)
            // Its own process group: a Ctrl-C in the terminal reaches only us, and we stop Dovecot in order.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", dovecot.display()))?;
        let pid = child.id().context("Dovecot exited at once")?;
        let imap = SocketAddr::from((MAIL_HOST, imap_port));
        let imaps = SocketAddr::from((MAIL_HOST, imaps_port));

        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "Dovecot exited during start-up ({status}):\n{}",
                    files.diagnostics()
                );
            }
            let ready = tokio::net::TcpStream::connect(imap).await.is_ok()
                && tokio::net::TcpStream::connect(imaps).await.is_ok();
            if ready {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!(
                    "Dovecot did not accept connections on {imap} and {imaps} within 15 s:\n{}",
                    files.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        tracing::info!(pid, %imap, %imaps, config = %files.config.display(), "Dovecot started");
        Ok(Self {
            child: Mutex::new(Some(child)),
            pid,
            imap,
            imaps,
            dir: files.dir.clone(),
            config: files.config.clone(),
            log: files.log.clone(),
            base_dir: files.base_dir.clone(),
            mail_root: opts.mail_root.clone(),
            instance,
            user,
        })
    }

    /// The STARTTLS listener (plain until `STARTTLS`; `LOGINDISABLED` before it).
    pub fn imap_addr(&self) -> SocketAddr {
        self.imap
    }

    /// The implicit-TLS listener.
    pub fn imaps_addr(&self) -> SocketAddr {
        self.imaps
    }

    /// The master process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn mail_root(&self) -> &Path {
        &self.mail_root
    }

    /// The instance name; its processes are titled `dovecot-<instance>/imap`, `dovecot-<instance>/auth`, ….
    pub fn instance_name(&self) -> &str {
        &self.instance
    }

    pub fn run_user(&self) -> &RunUser {
        &self.user
    }

    /// Stops the instance: SIGTERM to the master (which stops its children), up to 5 s, then SIGKILL.
    /// Idempotent.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.lock().await.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = Pid::from_raw(i32::try_from(self.pid)?);
        let _ = kill(pid, Signal::SIGTERM);
        match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    "Dovecot did not stop within 5 s of SIGTERM; killing it"
                );
                child.start_kill()?;
                child.wait().await?;
            }
        }
        // The master waited for its children; give stragglers (reaped late by PID 1, G8) a moment.
        wait_gone(&self.instance, Duration::from_secs(3)).await;
        if !self.base_dir.starts_with(&self.dir) {
            let _ = std::fs::remove_dir_all(&self.base_dir);
        }
        Ok(())
    }
}

/// Pids of live processes of an instance (titles `dovecot-<instance>/imap`, `dovecot-<instance>/auth`, …; the master
/// keeps its command line `dovecot -F -c …`).
pub fn processes_of(instance: &str) -> Vec<u32> {
    let prefixes = [format!("dovecot-{instance}/"), format!("{instance}/")];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let base = PathBuf::from(format!("/proc/{pid}"));
            // Zombies (state Z) are dead already; PID 1 reaps them late here (G8).
            let zombie = std::fs::read_to_string(base.join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                })
                .unwrap_or(true);
            let title = std::fs::read(base.join("cmdline")).unwrap_or_default();
            !zombie && prefixes.iter().any(|p| title.starts_with(p.as_bytes()))
        })
        .collect()
}

async fn wait_gone(instance: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !processes_of(instance).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A name unique to the directory, shown in the instance's process titles.
fn instance_name(dir: &Path) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, dir.as_os_str().as_encoded_bytes());
    let hex: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("mq-sandbox-{hex}")
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Dovecot's socket directory: `<dir>/run`, or a short one in the temp dir when that path would make socket paths
/// longer than a Unix socket address allows (108 bytes).
fn base_dir(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    if run.as_os_str().len() <= 70 {
        return run;
    }
    std::env::temp_dir().join(format!("{}-run", instance_name(dir)))
}

/// The instance's files and directories, created with the right owners.
struct Files {
    dir: PathBuf,
    config: PathBuf,
    passdb: PathBuf,
    base_dir: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    stderr: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn create(opts: &DovecotOptions, user: &RunUser) -> anyhow::Result<Self> {
        let dir = opts.dir.clone();
        let files = Self {
            config: dir.join("dovecot.conf"),
            passdb: dir.join("oauth2-passdb.conf"),
            base_dir: base_dir(&dir),
            state_dir: dir.join("state"),
            log: dir.join("dovecot.log"),
            stderr: dir.join("dovecot.stderr"),
            cert: dir.join("tls-cert.pem"),
            key: dir.join("tls-key.pem"),
            dir,
        };
        for d in [
            &files.dir,
            &files.base_dir,
            &files.state_dir,
            &opts.mail_root,
        ] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
            user.own(d)?;
        }
        // A stale base_dir from an earlier run is fine: the master cleans it up (and refuses if one still runs).
        copy_private(&opts.cert_pem, &files.cert, 0o644, user)?;
        copy_private(&opts.key_pem, &files.key, 0o600, user)?;
        // The log is created by the master as the run user; remove an old one so each run starts clean.
        let _ = std::fs::remove_file(&files.log);
        Ok(files)
    }

    /// The tail of the log and stderr, for start-up errors.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for path in [&self.stderr, &self.log] {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            let _ = writeln!(out, "--- {} ---\n{}", path.display(), tail.join("\n"));
        }
        out
    }
}

fn copy_private(from: &Path, to: &Path, mode: u32, user: &RunUser) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(to);
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    user.own(to)
}

fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The oauth2 passdb settings: Dovecot posts the login name and the bearer token to the emulator's grant endpoint
/// as a password grant; the emulator answers 200 with `username` (allow) or 400 `invalid_grant` (deny).
fn passdb_config(grant_url: &str) -> String {
    format!(
        "# Generated by mailqueue-sandbox. The emulator decides every login (token, tenant, FullAccess).\n\
         grant_url = {grant_url}\n\
         use_grant_password = yes\n\
         # Must be non-empty, or the auth process dies at start.\n\
         client_id = dovecot\n\
         client_secret = unused\n\
         username_attribute = username\n\
         username_format = %Lu\n\
         active_attribute = active\n\
         active_value = true\n\
         timeout_msecs = 5000\n"
    )
}

struct Config<'a> {
    files: &'a Files,
    mail_root: &'a Path,
    instance: &'a str,
    user: &'a RunUser,
    imap_port: u16,
    imaps_port: u16,
}

impl Config<'_> {
    fn render(&self) -> String {
        let f = self.files;
        let user = &self.user.name;
        let group = &self.user.group;
        let mut folders = String::new();
        for (name, special) in SPECIAL_FOLDERS {
            let _ = write!(
                folders,
                "  mailbox \"{name}\" {{\n    special_use = {special}\n    auto = subscribe\n  }}\n"
            );
        }
        format!(
            r#"# Generated by mailqueue-sandbox: a standalone Dovecot for the local Microsoft 365 sandbox.
# Nothing in /etc/dovecot is read. Start: dovecot -F -c {config}
instance_name = {instance}
base_dir = {base_dir}
state_dir = {state_dir}
log_path = {log}
info_log_path = {log}
debug_log_path = {log}
auth_verbose = yes
verbose_proctitle = yes

protocols = imap
# Not 127.0.0.1: there Dovecot treats every client as secured and allows XOAUTH2 in cleartext.
listen = {host}
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes

auth_mechanisms = xoauth2 oauthbearer
auth_failure_delay = 0
# Every login asks the emulator: a revoked token is refused at the next login.
auth_cache_size = 0

# One unprivileged user for everything (Dovecot refuses to run logins as root).
default_login_user = {user}
default_internal_user = {user}
default_internal_group = {group}
mail_uid = {user}
mail_gid = {group}
first_valid_uid = 1
first_valid_gid = 1

# Answers failures at once (without it they come in 500 ms batches).
passdb {{
  driver = static
  mechanisms = xoauth2 oauthbearer
  args = noauthenticate=y nodelay=y
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {passdb}
}}
userdb {{
  driver = static
  args = home={mail_root}/%Lu allow_all_users=yes
}}

mail_location = maildir:~/Maildir
mail_fsync = never
# IDLE: inotify pushes new mail at once; this is the fallback check.
mailbox_idle_check_interval = 1 secs
mail_max_userip_connections = 1000
default_process_limit = 1000
default_client_limit = 4000

namespace inbox {{
  inbox = yes
  separator = /
{folders}}}

# No auth-failure tarpit (2, 4, 8 … 15 s per client IP).
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  chroot =
  process_min_avail = 2
  inet_listener imap {{
    address = {host}
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = {host}
    port = {imaps_port}
    ssl = yes
  }}
}}
"#,
            config = f.config.display(),
            instance = self.instance,
            base_dir = f.base_dir.display(),
            state_dir = f.state_dir.display(),
            log = f.log.display(),
            host = MAIL_HOST,
            cert = f.cert.display(),
            key = f.key.display(),
            passdb = f.passdb.display(),
            mail_root = self.mail_root.display(),
            imap_port = self.imap_port,
            imaps_port = self.imaps_port,
        )
    }
}
