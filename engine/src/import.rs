//! `mailqueue import`: feeds `.eml` files, Maildir folders and mbox files through the ingest pipeline.
//!
//! Each path may be
//! * a file: an mbox when its first line starts with `From ` (the mbox separator), else one RFC 822 message;
//! * a Maildir (a folder with `cur/` or `new/`): the files of `cur/` and `new/`, in name order (Maildir++
//!   sub-folders such as `.Sent` are not followed);
//! * any other folder: its files and sub-folders, recursively, in name order; hidden entries are skipped.
//!
//! Mail is ingested on one queue address with its content hash as source key, so importing the same files again
//! gives duplicates. Files are read one at a time and mbox files message by message.

use std::{
    fmt,
    io::IsTerminal,
    path::{Path, PathBuf},
};

use anyhow::{Context, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::{
    engine::Engine,
    ingest::{Incoming, Outcome},
};

/// A progress bar is shown (on a terminal) for imports of more messages than this.
const PROGRESS_THRESHOLD: u64 = 50;
/// At most this many failures are kept with their reasons.
const MAX_FAILURES: usize = 100;
/// Folders nested deeper than this are not followed.
const MAX_DEPTH: usize = 32;

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// Mails that opened a new contact.
    pub imported: u64,
    /// Mails stored before (same content).
    pub duplicate: u64,
    /// Mails that joined an existing contact (replies, and automated mail attached to its contact).
    pub threaded: u64,
    /// Mails kept in quarantine (too large, unparsable).
    pub quarantined: u64,
    /// Mails or files that could not be read or stored.
    pub failed: u64,
    /// The first failures, with where and why.
    pub failures: Vec<ImportFailure>,
}

/// One mail or file that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportFailure {
    /// The file, with `#n` for the n-th message of an mbox.
    pub source: String,
    pub error: String,
}

impl ImportReport {
    /// Every mail seen.
    pub fn total(&self) -> u64 {
        self.imported + self.duplicate + self.threaded + self.quarantined + self.failed
    }

    fn record(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Created { .. } => self.imported += 1,
            Outcome::Threaded { .. } | Outcome::Attached { .. } => self.threaded += 1,
            Outcome::Duplicate => self.duplicate += 1,
            Outcome::Quarantined { .. } => self.quarantined += 1,
        }
    }

    fn fail(&mut self, source: String, error: String) {
        tracing::warn!(%source, %error, "import failed");
        self.failed += 1;
        if self.failures.len() < MAX_FAILURES {
            self.failures.push(ImportFailure { source, error });
        }
    }
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} mails: {} imported, {} threaded, {} duplicate, {} quarantined, {} failed",
            self.total(),
            self.imported,
            self.threaded,
            self.duplicate,
            self.quarantined,
            self.failed
        )
    }
}

/// Imports `paths` into `queue`, as mail that arrived on `address` (default: the queue's first address).
///
/// Fails before importing anything when the queue or address is wrong or a path cannot be read; afterwards a
/// mail that cannot be read or stored is counted as failed and the import goes on.
pub async fn import_paths(
    engine: &Engine,
    queue: &str,
    address: Option<&str>,
    paths: &[PathBuf],
    progress: bool,
) -> anyhow::Result<ImportReport> {
    let config = engine.config().await;
    let q = config
        .queue(queue)
        .ok_or_else(|| anyhow!("there is no queue named `{queue}`"))?;
    let address = match address {
        Some(a) => q
            .addresses
            .iter()
            .find(|x| x.address.as_str().eq_ignore_ascii_case(a.trim()))
            .map(|x| x.address.to_string())
            .ok_or_else(|| {
                let own: Vec<&str> = q.addresses.iter().map(|x| x.address.as_str()).collect();
                anyhow!(
                    "`{a}` is not an address of queue `{queue}` (its addresses: {})",
                    own.join(", ")
                )
            })?,
        None => q
            .addresses
            .first()
            .map(|x| x.address.to_string())
            .ok_or_else(|| anyhow!("queue `{queue}` has no address"))?,
    };
    drop(config);

    let roots = paths.to_vec();
    let files = tokio::task::spawn_blocking(move || {
        let mut files = Vec::new();
        for p in &roots {
            collect(p, &mut files, 0)?;
        }
        Ok::<_, anyhow::Error>(files)
    })
    .await
    .context("listing the files to import")??;

    let bar = if progress && std::io::stderr().is_terminal() {
        let total = count_messages(&files).await;
        (total > PROGRESS_THRESHOLD).then(|| {
            let bar = ProgressBar::new(total);
            let style =
                ProgressStyle::with_template("{elapsed_precise} {wide_bar} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        })
    } else {
        None
    };

    let mut report = ImportReport::default();
    for file in &files {
        import_file(engine, &address, file, &mut report, bar.as_ref()).await;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    tracing::info!(queue, %address, %report, "import finished");
    Ok(report)
}

async fn import_file(
    engine: &Engine,
    address: &str,
    path: &Path,
    report: &mut ImportReport,
    bar: Option<&ProgressBar>,
) {
    let name = path.display().to_string();
    let mut reader = match tokio::fs::File::open(path).await {
        Ok(f) => BufReader::with_capacity(64 * 1024, f),
        Err(e) => return report.fail(name, format!("cannot open: {e}")),
    };
    let is_mbox = match looks_like_mbox(&mut reader).await {
        Ok(m) => m,
        Err(e) => return report.fail(name, format!("cannot read: {e}")),
    };
    if !is_mbox {
        let mut raw = Vec::new();
        if let Err(e) = reader.read_to_end(&mut raw).await {
            return report.fail(name, format!("cannot read: {e}"));
        }
        ingest_one(engine, address, &raw, name, report, bar).await;
        return;
    }
    let mut mbox = MboxReader::new(reader);
    let mut n = 0;
    loop {
        match mbox.next_message().await {
            Ok(Some(raw)) => {
                n += 1;
                ingest_one(engine, address, &raw, format!("{name}#{n}"), report, bar).await;
            }
            Ok(None) => break,
            Err(e) => {
                report.fail(format!("{name}#{}", n + 1), format!("cannot read: {e}"));
                break;
            }
        }
    }
}

async fn ingest_one(
    engine: &Engine,
    address: &str,
    raw: &[u8],
    source: String,
    report: &mut ImportReport,
    bar: Option<&ProgressBar>,
) {
    // Without the sender limit: an archive holds many mails of one sender.
    match engine
        .ingest_unlimited(Incoming {
            raw,
            address,
            source_key: None,
        })
        .await
    {
        Ok(outcome) => report.record(&outcome),
        Err(e) => report.fail(source, e.to_string()),
    }
    if let Some(bar) = bar {
        bar.inc(1);
        bar.set_message(format!(
            "{} imported, {} threaded, {} duplicate",
            report.imported, report.threaded, report.duplicate
        ));
    }
}

/// The files to import under `path` (see the module doc), in order.
fn collect(path: &Path, out: &mut Vec<PathBuf>, depth: usize) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_file() {
        out.push(path.to_owned());
        return Ok(());
    }
    if !meta.is_dir() {
        bail!("{} is neither a file nor a folder", path.display());
    }
    if depth > MAX_DEPTH {
        bail!("{} is nested too deeply", path.display());
    }
    let (cur, new) = (path.join("cur"), path.join("new"));
    if cur.is_dir() || new.is_dir() {
        for sub in [cur, new] {
            if sub.is_dir() {
                out.extend(entries(&sub)?.into_iter().filter(|p| p.is_file()));
            }
        }
        return Ok(());
    }
    for entry in entries(path)? {
        collect(&entry, out, depth + 1)?;
    }
    Ok(())
}

/// The non-hidden entries of a folder, sorted by name.
fn entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut list = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            list.push(entry.path());
        }
    }
    list.sort();
    Ok(list)
}

/// Messages in `files`, for the progress bar (mbox files are scanned once more); unreadable files count as one.
async fn count_messages(files: &[PathBuf]) -> u64 {
    let mut total = 0;
    for path in files {
        let Ok(file) = tokio::fs::File::open(path).await else {
            total += 1;
            continue;
        };
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        if !matches!(looks_like_mbox(&mut reader).await, Ok(true)) {
            total += 1;
            continue;
        }
        let mut mbox = MboxReader::new(reader);
        while let Ok(Some(_)) = mbox.next_message().await {
            total += 1;
        }
    }
    total
}

/// Whether the content starts (after blank lines) with an mbox `From ` separator; reads nothing away.
async fn looks_like_mbox<R: AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<bool> {
    let head = reader.fill_buf().await?;
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    Ok(head[start..].starts_with(b"From "))
}

/// Splits an mbox into messages, one at a time. A separator is a `From ` line shaped like an envelope line
/// (`From sender Sat Nov 14 10:00:00 2026`) after a blank line (the first line of the file may be any `From `
/// line), so an unescaped
/// `From ` sentence in a body (mboxo writers) rarely splits a message. Escaped body lines
/// (`>From `, `>>From ` …) lose one `>` (mboxrd). The blank line that ends each message in the mbox is dropped.
pub struct MboxReader<R> {
    reader: R,
    line: Vec<u8>,
    /// A separator was read for the next message.
    started: bool,
    prev_blank: bool,
}

impl<R: AsyncBufRead + Unpin> MboxReader<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            line: Vec::new(),
            started: false,
            prev_blank: false,
        }
    }

    /// The next message's raw bytes, `None` at the end.
    pub async fn next_message(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut msg: Vec<u8> = Vec::new();
        let mut in_message = self.started;
        loop {
            self.line.clear();
            if self.reader.read_until(b'\n', &mut self.line).await? == 0 {
                self.started = false;
                return Ok(finish(msg));
            }
            let line = &self.line[..];
            if line.starts_with(b"From ")
                && (!in_message || (self.prev_blank && envelope_like(line)))
            {
                self.prev_blank = false;
                if in_message && let Some(done) = finish(std::mem::take(&mut msg)) {
                    self.started = true;
                    return Ok(Some(done));
                }
                in_message = true;
                continue;
            }
            self.prev_blank = line == b"\n" || line == b"\r\n";
            if !in_message {
                continue;
            }
            let quotes = line.iter().take_while(|&&b| b == b'>').count();
            if quotes > 0 && line[quotes..].starts_with(b"From ") {
                msg.extend_from_slice(&line[1..]);
            } else {
                msg.extend_from_slice(line);
            }
        }
    }
}

/// A message without the mbox's trailing blank line; `None` if it is empty.
fn finish(mut msg: Vec<u8>) -> Option<Vec<u8>> {
    if msg.ends_with(b"\r\n\r\n") {
        msg.truncate(msg.len() - 2);
    } else if msg.ends_with(b"\n\n") {
        msg.truncate(msg.len() - 1);
    }
    (!msg.iter().all(u8::is_ascii_whitespace)).then_some(msg)
}

/// `From <sender> <date with a hh:mm time>`: the shape of an envelope line, as opposed to prose.
fn envelope_like(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    let mut words = text.split_ascii_whitespace().skip(1);
    words.next().is_some()
        && words.any(|w| {
            let mut parts = w.split(':');
            let h = parts.next().unwrap_or_default();
            let m = parts.next().unwrap_or_default();
            (1..=2).contains(&h.len())
                && m.len() == 2
                && h.chars().chain(m.chars()).all(|c| c.is_ascii_digit())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn split(data: &[u8]) -> Vec<String> {
        let mut r = MboxReader::new(data);
        let mut out = Vec::new();
        while let Some(m) = r.next_message().await.unwrap() {
            out.push(String::from_utf8(m).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn mbox_splits_and_unescapes() {
        let data = b"From a@b Sat Nov 14 10:00:00 2026\nSubject: one\n\nFrom here on\n>From x\n>>From y\n\nFrom c@d Sat Nov 14 10:01:00 2026\r\nSubject: two\r\n\r\nbody\r\n\r\n";
        let msgs = split(data).await;
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert_eq!(msgs[0], "Subject: one\n\nFrom here on\nFrom x\n>From y\n");
        assert_eq!(msgs[1], "Subject: two\r\n\r\nbody\r\n");
    }

    #[tokio::test]
    async fn prose_from_line_inside_a_paragraph_is_not_a_separator() {
        let data = b"From a@b Sat Nov 14 10:00:00 2026\nSubject: one\n\nline\nFrom me to you at 10:30 Monday\n";
        let msgs = split(data).await;
        assert_eq!(
            msgs,
            vec!["Subject: one\n\nline\nFrom me to you at 10:30 Monday\n".to_owned()]
        );
    }
}
