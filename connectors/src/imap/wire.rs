//! Small pieces of IMAP syntax: UID sequence sets, folder names (quoted, modified UTF-7), response texts.

use async_imap::imap_proto::{Outcome, ResponseCode};
use base64::{
    Engine as _, alphabet,
    engine::{GeneralPurpose, general_purpose::NO_PAD},
};

/// A compact UID set for `UID FETCH`/`STORE`/…: sorted, duplicates and 0 dropped, runs joined: `5:9,12,15:20`.
/// Empty input gives an empty string.
pub fn uid_set(uids: &[u32]) -> String {
    let mut sorted: Vec<u32> = uids.iter().copied().filter(|&u| u != 0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// Sorted, deduplicated, non-zero UIDs in chunks of at most `max` (one command each).
pub(crate) fn uid_chunks(uids: &[u32], max: usize) -> Vec<Vec<u32>> {
    let mut sorted: Vec<u32> = uids.iter().copied().filter(|&u| u != 0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.chunks(max.max(1)).map(<[u32]>::to_vec).collect()
}

const MUTF7: GeneralPurpose = GeneralPurpose::new(&alphabet::IMAP_MUTF7, NO_PAD);

/// A folder name in IMAP's modified UTF-7 (RFC 3501 §5.1.3): printable ASCII as is, `&` as `&-`, anything else as
/// `&<base64 of UTF-16BE>-`.
pub fn encode_folder(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if !pending.is_empty() {
            let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
            out.push('&');
            out.push_str(&MUTF7.encode(bytes));
            out.push('-');
            pending.clear();
        }
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// A quoted string (`"…"` with `\` and `"` escaped). `None` if the value cannot be sent as one (CR, LF, NUL).
pub(crate) fn quote(value: &str) -> Option<String> {
    if value.contains(['\r', '\n', '\0']) {
        return None;
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Some(out)
}

/// The folder as a command argument: modified UTF-7, quoted. `None` for an empty name or control characters.
pub(crate) fn folder_arg(name: &str) -> Option<String> {
    if name.is_empty() || name.contains(char::is_control) {
        return None;
    }
    quote(&encode_folder(name))
}

/// `[CODE] text` of a status response, as the server sent it (codes imap-proto does not know stay in the text).
pub(crate) fn outcome_text(outcome: &Outcome<'_>) -> String {
    let text = outcome.information.as_deref().unwrap_or("").trim();
    let code = outcome.code.as_ref().map(|code| match code {
        ResponseCode::Alert => "ALERT".to_owned(),
        ResponseCode::Parse => "PARSE".to_owned(),
        ResponseCode::ReadOnly => "READ-ONLY".to_owned(),
        ResponseCode::ReadWrite => "READ-WRITE".to_owned(),
        ResponseCode::TryCreate => "TRYCREATE".to_owned(),
        ResponseCode::UidNext(n) => format!("UIDNEXT {n}"),
        ResponseCode::UidValidity(n) => format!("UIDVALIDITY {n}"),
        ResponseCode::Unseen(n) => format!("UNSEEN {n}"),
        ResponseCode::UidNotSticky => "UIDNOTSTICKY".to_owned(),
        ResponseCode::BadCharset(_) => "BADCHARSET".to_owned(),
        ResponseCode::Capabilities(_) => "CAPABILITY".to_owned(),
        ResponseCode::PermanentFlags(_) => "PERMANENTFLAGS".to_owned(),
        ResponseCode::AppendUid(..) => "APPENDUID".to_owned(),
        ResponseCode::CopyUid(..) => "COPYUID".to_owned(),
        other => format!("{other:?}").to_ascii_uppercase(),
    });
    clip(&match code {
        Some(code) if text.is_empty() => format!("[{code}]"),
        Some(code) => format!("[{code}] {text}"),
        None => text.to_owned(),
    })
}

/// The server's text out of an async-imap error, which formats a `NO`/`BAD` as
/// `code: Some(TryCreate), info: Some("…")`. Other errors are shown as they are.
pub(crate) fn async_imap_text(error: &async_imap::error::Error) -> String {
    use async_imap::error::Error;
    let (Error::No(raw) | Error::Bad(raw)) = error else {
        return clip(&error.to_string());
    };
    let code = raw
        .strip_prefix("code: Some(")
        .and_then(|rest| rest.split_once(')'))
        .map(|(code, _)| code.split('(').next().unwrap_or(code).to_ascii_uppercase());
    let info = raw
        .split_once("info: Some(\"")
        .and_then(|(_, rest)| rest.strip_suffix("\")"))
        .map(unescape_debug);
    clip(&match (code, info) {
        (Some(code), Some(info)) => format!("[{code}] {info}"),
        (None, Some(info)) => info,
        (Some(code), None) => format!("[{code}]"),
        (None, None) => raw.clone(),
    })
}

/// Undoes Rust's `{:?}` escaping of a string (enough for server texts).
fn unescape_debug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('0') => out.push('\0'),
            Some('u') => {
                let hex: String = chars
                    .by_ref()
                    .skip_while(|&c| c == '{')
                    .take_while(|&c| c != '}')
                    .collect();
                if let Some(c) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    out.push(c);
                }
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Server texts are shown to people: bounded, one line.
pub(crate) fn clip(text: &str) -> String {
    const MAX: usize = 400;
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let one_line = one_line.trim();
    if one_line.chars().count() <= MAX {
        one_line.to_owned()
    } else {
        let mut s: String = one_line.chars().take(MAX).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets_are_compact_and_sorted() {
        assert_eq!(uid_set(&[]), "");
        assert_eq!(uid_set(&[7]), "7");
        assert_eq!(
            uid_set(&[20, 5, 6, 7, 8, 9, 12, 15, 16, 17, 18, 19, 9, 0]),
            "5:9,12,15:20"
        );
        assert_eq!(uid_set(&[1, 3, 5]), "1,3,5");
        assert_eq!(uid_set(&[u32::MAX, u32::MAX - 1]), "4294967294:4294967295");
    }

    #[test]
    fn chunks_are_sorted_and_bounded() {
        let uids: Vec<u32> = (1..=250).rev().collect();
        let chunks = uid_chunks(&uids, 100);
        assert_eq!(
            chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            [100, 100, 50]
        );
        assert_eq!(chunks[0][0], 1);
        assert_eq!(chunks[2][49], 250);
    }

    #[test]
    fn folder_names_use_modified_utf7() {
        assert_eq!(encode_folder("INBOX"), "INBOX");
        assert_eq!(encode_folder("Sent Items"), "Sent Items");
        assert_eq!(encode_folder("A&B"), "A&-B");
        assert_eq!(encode_folder("Gelöscht"), "Gel&APY-scht");
        assert_eq!(encode_folder("台北"), "&U,BTFw-");
        assert_eq!(
            encode_folder("~peter/mail/日本語"),
            "~peter/mail/&ZeVnLIqe-"
        );
        assert_eq!(
            folder_arg("Quarantine \"x\"").as_deref(),
            Some(r#""Quarantine \"x\"""#)
        );
        assert_eq!(folder_arg("a\r\nb"), None);
        assert_eq!(folder_arg(""), None);
    }

    #[test]
    fn async_imap_texts_are_cleaned() {
        use async_imap::error::Error;
        let e = Error::No(
            "code: None, info: Some(\"[AUTHENTICATIONFAILED] Authentication failed.\")".into(),
        );
        assert_eq!(
            async_imap_text(&e),
            "[AUTHENTICATIONFAILED] Authentication failed."
        );
        let e = Error::No(
            "code: Some(TryCreate), info: Some(\"Mailbox \\\"x\\\" doesn't exist\")".into(),
        );
        assert_eq!(
            async_imap_text(&e),
            "[TRYCREATE] Mailbox \"x\" doesn't exist"
        );
        let e = Error::No("code: None, info: Some(\"AUTHENTICATE failed.\")".into());
        assert_eq!(async_imap_text(&e), "AUTHENTICATE failed.");
        assert_eq!(async_imap_text(&Error::ConnectionLost), "connection lost");
    }
}
