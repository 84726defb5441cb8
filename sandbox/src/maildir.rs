//! Direct Maildir delivery into the mail store Dovecot serves: `<mail_root>/<mailbox lower-cased>/Maildir`, the
//! layout of Dovecot's `home=<mail_root>/%Lu` + `mail_location = maildir:~/Maildir`. Each message is written to
//! `tmp/` and renamed into `new/` (or `cur/` with flags), so Dovecot never sees a partial file. When the sandbox runs
//! as root, every directory and file it creates is chowned to Dovecot's run user (`owner`).

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, chown},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// Delivers one message into `mailbox`'s INBOX (`Maildir/new/`), creating the Maildir if needed.
pub fn deliver(
    mail_root: &Path,
    mailbox: &str,
    raw: &[u8],
    owner: Option<(u32, u32)>,
) -> io::Result<PathBuf> {
    Maildir::open(mail_root, mailbox, owner)?.deliver(raw)
}

/// Delivers many messages into `mailbox`'s INBOX with one directory set-up (tens of thousands per second).
/// Returns the paths in input order.
pub fn deliver_many<I>(
    mail_root: &Path,
    mailbox: &str,
    messages: I,
    owner: Option<(u32, u32)>,
) -> io::Result<Vec<PathBuf>>
where
    I: IntoIterator,
    I::Item: AsRef<[u8]>,
{
    let maildir = Maildir::open(mail_root, mailbox, owner)?;
    messages
        .into_iter()
        .map(|raw| maildir.deliver(raw.as_ref()))
        .collect()
}

/// `<mail_root>/<mailbox lower-cased>/Maildir`, without touching the disk.
pub fn maildir_path(mail_root: &Path, mailbox: &str) -> io::Result<PathBuf> {
    Ok(mail_root.join(home_name(mailbox)?).join("Maildir"))
}

/// One Maildir (an INBOX or a Maildir++ folder) ready for delivery.
#[derive(Debug, Clone)]
pub struct Maildir {
    dir: PathBuf,
    owner: Option<(u32, u32)>,
}

impl Maildir {
    /// Opens (creating as needed) `<mail_root>/<mailbox lower-cased>/Maildir` with `cur`, `new` and `tmp`.
    pub fn open(mail_root: &Path, mailbox: &str, owner: Option<(u32, u32)>) -> io::Result<Self> {
        let home_name = home_name(mailbox)?;
        if !mail_root.exists() {
            fs::create_dir_all(mail_root)?;
            set_owner(mail_root, owner)?;
        }
        let home = mail_root.join(home_name);
        ensure_dir(&home, owner)?;
        let dir = home.join("Maildir");
        ensure_dir(&dir, owner)?;
        let maildir = Self { dir, owner };
        maildir.ensure_subdirs()?;
        Ok(maildir)
    }

    /// A Maildir++ folder of this mailbox (e.g. `Sent Items` → `Maildir/.Sent Items`), created as needed.
    pub fn folder(&self, name: &str) -> io::Result<Self> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad folder name {name:?}"),
            ));
        }
        let dir = self.dir.join(format!(".{name}"));
        ensure_dir(&dir, self.owner)?;
        let folder = Self {
            dir,
            owner: self.owner,
        };
        folder.ensure_subdirs()?;
        let marker = folder.dir.join("maildirfolder");
        if !marker.exists() {
            fs::write(&marker, b"")?;
            set_owner(&marker, self.owner)?;
        }
        Ok(folder)
    }

    /// The Maildir directory (holding `cur`, `new`, `tmp`).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Delivers a new (unseen) message into `new/`.
    pub fn deliver(&self, raw: &[u8]) -> io::Result<PathBuf> {
        let name = unique_name(raw.len());
        self.write(raw, &name, &self.dir.join("new").join(&name))
    }

    /// Stores a message as already seen (`cur/<name>:2,S`), as a mail client files its own sent copy.
    pub fn deliver_seen(&self, raw: &[u8]) -> io::Result<PathBuf> {
        let name = unique_name(raw.len());
        self.write(
            raw,
            &name,
            &self.dir.join("cur").join(format!("{name}:2,S")),
        )
    }

    fn write(&self, raw: &[u8], name: &str, target: &Path) -> io::Result<PathBuf> {
        let tmp = self.dir.join("tmp").join(name);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(raw)?;
        drop(file);
        set_owner(&tmp, self.owner)?;
        if let Err(e) = fs::rename(&tmp, target) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(target.to_path_buf())
    }

    fn ensure_subdirs(&self) -> io::Result<()> {
        for sub in ["cur", "new", "tmp"] {
            ensure_dir(&self.dir.join(sub), self.owner)?;
        }
        Ok(())
    }
}

/// The home directory name Dovecot derives with `%Lu` (ASCII lower case), refusing path tricks.
fn home_name(mailbox: &str) -> io::Result<String> {
    let name = mailbox.trim().to_ascii_lowercase();
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad mailbox name {mailbox:?}"),
        ));
    }
    Ok(name)
}

/// Creates `dir` if missing (tolerating a concurrent creator) and chowns it when this call created it.
fn ensure_dir(dir: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    match fs::create_dir(dir) {
        Ok(()) => set_owner(dir, owner),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

fn set_owner(path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    match owner {
        Some((uid, gid)) => chown(path, Some(uid), Some(gid)),
        None => Ok(()),
    }
}

/// A Maildir unique name: `<secs>.M<usecs>P<pid>Q<seq>.sandbox,S=<size>` (`S=` lets Dovecot skip a stat).
fn unique_name(size: usize) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}.M{}P{}Q{}.sandbox,S={}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        seq,
        size
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_into_new_via_tmp_and_in_bulk() {
        let root = std::env::temp_dir().join(format!(
            "mq-sandbox-maildir-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let path = deliver(
            &root,
            "Support@Contoso.com",
            b"Subject: hi\r\n\r\nbody\r\n",
            None,
        )
        .unwrap();
        assert!(path.starts_with(root.join("support@contoso.com/Maildir/new")));
        assert_eq!(fs::read(&path).unwrap(), b"Subject: hi\r\n\r\nbody\r\n");
        assert!(root.join("support@contoso.com/Maildir/cur").is_dir());
        assert_eq!(
            fs::read_dir(root.join("support@contoso.com/Maildir/tmp"))
                .unwrap()
                .count(),
            0
        );

        let messages: Vec<Vec<u8>> = (0..2000)
            .map(|i| format!("Subject: {i}\r\n\r\n{i}\r\n").into_bytes())
            .collect();
        let started = std::time::Instant::now();
        let paths = deliver_many(&root, "sales@contoso.com", &messages, None).unwrap();
        let elapsed = started.elapsed();
        assert_eq!(paths.len(), 2000);
        assert_eq!(fs::read(&paths[1999]).unwrap(), messages[1999]);
        assert!(elapsed.as_secs() < 10, "{elapsed:?}");

        let sent = Maildir::open(&root, "sales@contoso.com", None)
            .unwrap()
            .folder("Sent Items")
            .unwrap();
        let seen = sent.deliver_seen(b"x").unwrap();
        assert!(seen.to_string_lossy().ends_with(":2,S"));
        assert!(
            root.join("sales@contoso.com/Maildir/.Sent Items/maildirfolder")
                .exists()
        );

        assert!(deliver(&root, "../etc", b"x", None).is_err());
        fs::remove_dir_all(&root).unwrap();
    }
}
