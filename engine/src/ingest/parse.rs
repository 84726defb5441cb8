//! Parsing RFC 822 bytes into a [`ParsedMail`]: the fields the store keeps, plus what the ingest policies need
//! from delivery reports (RFC 3462 `multipart/report`, RFC 3464 `message/delivery-status`).

use std::{
    borrow::Cow,
    panic::{AssertUnwindSafe, catch_unwind},
};

use chrono::{DateTime, TimeZone, Utc};
use mail_parser::{
    Address, HeaderValue, Message, MessageParser, MimeHeaders, PartType,
    decoders::charsets::map::charset_decoder,
};
use serde::Serialize;
use serde_json::json;

use crate::store::messages::NewMessage;

/// At most this many References are kept and looked up (the newest ones).
const MAX_REFERENCES: usize = 50;

/// A mail parsed into what the store needs; owned, so nothing borrowed crosses an `await`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedMail {
    /// Without angle brackets, like every Message-ID the store keeps.
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    /// Oldest first, at most the newest 50.
    pub references: Vec<String>,
    pub from: Option<Mailbox>,
    pub reply_to: Option<Mailbox>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    /// Decoded (RFC 2047).
    pub subject: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    /// The top-level header fields in order, unfolded, as `(name, raw value)`.
    pub headers: Vec<(String, String)>,
    pub text_body: Option<String>,
    pub html_body: Option<String>,
    pub attachments: Vec<ParsedAttachment>,
    /// Set when the mail is a `multipart/report` or carries a `message/delivery-status` part.
    pub report: Option<Report>,
    /// The Message-ID of the mail a delivery report (or a bounce in any shape) is about, without angle brackets:
    /// from an enclosed `message/rfc822` part, else a `text/rfc822-headers` part, else an `Original-Message-ID`
    /// field (top-level or in the delivery-status part), else `X-Original-Message-ID`.
    pub original_message_id: Option<String>,
}

/// What a delivery report says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The `report-type` of a top-level `multipart/report`, lower case (`delivery-status`,
    /// `disposition-notification`, …); `None` when the mail is not a `multipart/report`.
    pub report_type: Option<String>,
    /// Whether a `message/delivery-status` (or `message/global-delivery-status`) part is present.
    pub delivery_status: bool,
    /// The first recipient's `Status:` of the delivery-status part, e.g. `5.1.1`.
    pub status: Option<String>,
    /// The first recipient's `Diagnostic-Code:`, e.g. `smtp; 550 5.1.1 User unknown`.
    pub diagnostic: Option<String>,
    /// The first recipient's `Action:` (`failed`, `delayed`, `delivered`, …).
    pub action: Option<String>,
    /// The first recipient's `Final-Recipient:`, e.g. `rfc822; nobody@example.com`.
    pub recipient: Option<String>,
}

impl Report {
    /// Whether this is a delivery status notification (a bounce or delay notice).
    pub fn is_delivery_status(&self) -> bool {
        self.delivery_status || self.report_type.as_deref() == Some("delivery-status")
    }
}

/// A name and address from an address header; either may be missing in broken mail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Mailbox {
    pub name: Option<String>,
    pub address: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAttachment {
    pub filename: Option<String>,
    /// `type/subtype`, lower case.
    pub content_type: String,
    /// Without angle brackets.
    pub content_id: Option<String>,
    pub inline: bool,
    pub data: Vec<u8>,
}

impl ParsedMail {
    pub(crate) fn to_new_message<'a>(
        &self,
        contact_id: i64,
        key: &str,
        mailbox: &str,
        raw: &'a [u8],
    ) -> NewMessage<'a> {
        let list = |l: &[Mailbox]| serde_json::to_value(l).unwrap_or_else(|_| json!([]));
        NewMessage {
            contact_id,
            direction: "inbound",
            source_key: Some(key.to_owned()),
            mailbox: Some(mailbox.to_owned()),
            message_id: self.message_id.clone(),
            in_reply_to: self.in_reply_to.clone(),
            references: json!(self.references),
            from_address: self.from.as_ref().and_then(|f| f.address.clone()),
            from_name: self.from.as_ref().and_then(|f| f.name.clone()),
            reply_to: self.reply_to.as_ref().and_then(|r| r.address.clone()),
            to_addresses: list(&self.to),
            cc_addresses: list(&self.cc),
            subject: self.subject.clone(),
            sent_at: self.sent_at,
            headers: json!(self.headers.iter().map(|(n, v)| [n, v]).collect::<Vec<_>>()),
            text_body: self.text_body.clone(),
            html_body: self.html_body.clone(),
            raw: Some(raw.into()),
            size: raw.len() as i64,
            created_by: None,
        }
    }
}

/// Parses RFC 822 bytes with mail-parser. `Err` carries the quarantine reason. Never panics: broken headers,
/// undecodable encoded words and unknown charsets degrade to lossy text; header lines in a legacy 8-bit charset
/// (not UTF-8) are decoded with the mail's declared charset, else Windows-1252.
pub fn parse_mail(raw: &[u8]) -> std::result::Result<ParsedMail, String> {
    catch_unwind(AssertUnwindSafe(|| parse_unguarded(raw)))
        .unwrap_or_else(|_| Err("unparsable: the MIME parser failed on this mail".into()))
}

fn parse_unguarded(raw: &[u8]) -> std::result::Result<ParsedMail, String> {
    let parser = MessageParser::default();
    let message = parser
        .parse(raw)
        .ok_or_else(|| "unparsable: not an RFC 822 message".to_owned())?;
    // mail-parser takes any text before a colon as a field name; binary junk yields names like "\0\0IHDR".
    if !message
        .root_part()
        .headers
        .iter()
        .any(|h| is_field_name(h.name.as_str()))
    {
        return Err("unparsable: no header fields".into());
    }
    match repair_header_charset(raw, &message) {
        Some(repaired) => {
            let message = parser
                .parse(&repaired)
                .ok_or_else(|| "unparsable: not an RFC 822 message".to_owned())?;
            Ok(extract(message))
        }
        None => Ok(extract(message)),
    }
}

/// RFC 5322 field-name: printable US-ASCII except the colon.
fn is_field_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// The header block with every non-UTF-8 line decoded from the mail's charset (else Windows-1252), followed by
/// the unchanged body; `None` when the header block is valid UTF-8 already.
fn repair_header_charset(raw: &[u8], message: &Message<'_>) -> Option<Vec<u8>> {
    let mut end = 0;
    for line in raw.split_inclusive(|&b| b == b'\n') {
        if line == b"\n" || line == b"\r\n" {
            break;
        }
        end += line.len();
    }
    let head = &raw[..end];
    if std::str::from_utf8(head).is_ok() {
        return None;
    }
    let declared = message
        .root_part()
        .content_type()
        .and_then(|ct| ct.attribute("charset"))
        .filter(|c| {
            !c.to_ascii_lowercase()
                .replace(['-', '_'], "")
                .starts_with("utf")
        })
        .and_then(|c| charset_decoder(c.as_bytes()));
    let decode = declared.or_else(|| charset_decoder(b"windows-1252"))?;
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 8);
    for line in head.split_inclusive(|&b| b == b'\n') {
        match std::str::from_utf8(line) {
            Ok(_) => out.extend_from_slice(line),
            Err(_) => out.extend_from_slice(decode(line).as_bytes()),
        }
    }
    out.extend_from_slice(&raw[end..]);
    Some(out)
}

fn extract(mut message: Message<'_>) -> ParsedMail {
    let m = &message;
    let root = m.root_part();
    let headers: Vec<(String, String)> = root
        .headers
        .iter()
        .map(|h| {
            let value = m
                .raw_message
                .get(h.offset_start as usize..h.offset_end as usize)
                .unwrap_or_default();
            (
                clean(h.name.as_str()),
                unfold(&String::from_utf8_lossy(value)),
            )
        })
        .collect();

    let mut references: Vec<String> = Vec::new();
    for value in m.header_values("References") {
        for id in ids(value) {
            if !references.contains(&id) {
                references.push(id);
            }
        }
    }
    if references.len() > MAX_REFERENCES {
        references.drain(..references.len() - MAX_REFERENCES);
    }

    let text: Vec<String> = (0..m.text_body_count())
        .filter_map(|i| m.body_text(i))
        .map(|t| clean(&t))
        .collect();
    let has_html = m.html_bodies().any(|p| matches!(p.body, PartType::Html(_)));
    let html: Vec<String> = if has_html {
        (0..m.html_body_count())
            .filter_map(|i| m.body_html(i))
            .map(|t| clean(&t))
            .collect()
    } else {
        Vec::new()
    };

    let (report, original_message_id) = report(m, &headers);
    let mut parsed = ParsedMail {
        message_id: m.message_id().and_then(message_id),
        in_reply_to: m
            .header("In-Reply-To")
            .and_then(|v| ids(v).into_iter().next()),
        references,
        from: m.from().and_then(first_mailbox),
        reply_to: m.reply_to().and_then(first_mailbox),
        to: m.to().map(mailboxes).unwrap_or_default(),
        cc: m.cc().map(mailboxes).unwrap_or_default(),
        subject: m
            .subject()
            .map(|s| clean(s.trim()))
            .filter(|s| !s.is_empty()),
        sent_at: m
            .date()
            .filter(|d| d.is_valid())
            .and_then(|d| Utc.timestamp_opt(d.to_timestamp(), 0).single()),
        headers,
        text_body: (!text.is_empty()).then(|| text.join("\n")),
        html_body: (!html.is_empty()).then(|| html.join("\n")),
        attachments: Vec::new(),
        report,
        original_message_id,
    };
    // Last, because it moves the decoded attachments out of the message.
    parsed.attachments = attachments(&mut message);
    parsed
}

/// The delivery report of a mail, and the Message-ID of the mail it reports on.
fn report(m: &Message<'_>, headers: &[(String, String)]) -> (Option<Report>, Option<String>) {
    let root_type = m.root_part().content_type();
    let report_type = root_type
        .filter(|ct| {
            ct.ctype().eq_ignore_ascii_case("multipart")
                && ct
                    .subtype()
                    .is_some_and(|s| s.eq_ignore_ascii_case("report"))
        })
        .map(|ct| {
            ct.attribute("report-type")
                .map(|t| clean(t.trim()).to_ascii_lowercase())
                .unwrap_or_default()
        });
    let mut status_fields: Option<Vec<(String, String)>> = None;
    let mut enclosed: Option<String> = None;
    let mut enclosed_headers: Option<String> = None;
    for part in m.parts.iter().skip(1) {
        let Some(ct) = part.content_type() else {
            continue;
        };
        let kind = format!(
            "{}/{}",
            ct.ctype().to_ascii_lowercase(),
            ct.subtype().unwrap_or_default().to_ascii_lowercase()
        );
        match kind.as_str() {
            "message/delivery-status" | "message/global-delivery-status"
                if status_fields.is_none() =>
            {
                status_fields = Some(fields(&part_text(&part.body), true));
            }
            "message/rfc822" | "message/global" if enclosed.is_none() => {
                enclosed = match &part.body {
                    PartType::Message(inner) => inner.message_id().and_then(message_id),
                    other => {
                        field(&fields(&part_text(other), false), "Message-ID").and_then(message_id)
                    }
                };
            }
            "text/rfc822-headers" | "message/global-headers" if enclosed_headers.is_none() => {
                enclosed_headers = field(&fields(&part_text(&part.body), false), "Message-ID")
                    .and_then(message_id);
            }
            _ => {}
        }
    }
    let original = enclosed
        .or(enclosed_headers)
        .or_else(|| field(headers, "Original-Message-ID").and_then(message_id))
        .or_else(|| {
            status_fields
                .as_deref()
                .and_then(|f| field(f, "Original-Message-ID"))
                .and_then(message_id)
        })
        .or_else(|| field(headers, "X-Original-Message-ID").and_then(message_id));
    if report_type.is_none() && status_fields.is_none() {
        return (None, original);
    }
    let status = status_fields.unwrap_or_default();
    let get = |name: &str| {
        field(&status, name)
            .map(|v| clean(v.trim()))
            .filter(|v| !v.is_empty())
    };
    let report = Report {
        report_type,
        delivery_status: !status.is_empty(),
        status: get("Status"),
        diagnostic: get("Diagnostic-Code"),
        action: get("Action"),
        recipient: get("Final-Recipient"),
    };
    (Some(report), original)
}

/// A part's body as text, decoded lossily when it is binary.
fn part_text<'a>(body: &'a PartType<'_>) -> Cow<'a, str> {
    match body {
        PartType::Text(t) | PartType::Html(t) => Cow::Borrowed(t.as_ref()),
        PartType::Binary(b) | PartType::InlineBinary(b) => String::from_utf8_lossy(b),
        PartType::Message(inner) => String::from_utf8_lossy(inner.raw_message.as_ref()),
        PartType::Multipart(_) => Cow::Borrowed(""),
    }
}

/// Header-style fields (`Name: value`, folded lines joined), in order, of a header block (`groups` false: ends
/// at the first blank line) or of a delivery-status body (`groups` true: blank lines separate the per-message and
/// per-recipient groups). Stops at the first line that is neither a field nor a continuation.
fn fields(text: &str, groups: bool) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut blank = false;
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            if !groups {
                break;
            }
            blank = true;
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = out.last_mut().filter(|_| !blank) {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        match line.split_once(':') {
            Some((name, value)) if is_field_name(name) => {
                out.push((name.to_owned(), value.trim().to_owned()));
                blank = false;
            }
            _ => break,
        }
    }
    out
}

/// The first value of field `name` (case-insensitive).
fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The attachments, with their decoded bytes moved out of `m` (a 30 MB attachment is not copied).
fn attachments(m: &mut Message<'_>) -> Vec<ParsedAttachment> {
    let mut out = Vec::new();
    for id in m.attachments.clone() {
        let Some(part) = m.parts.get_mut(id as usize) else {
            continue;
        };
        let fallback_type = match &part.body {
            PartType::Binary(_) | PartType::InlineBinary(_) => "application/octet-stream",
            PartType::Text(_) => "text/plain",
            PartType::Html(_) => "text/html",
            PartType::Message(_) => "message/rfc822",
            PartType::Multipart(_) => continue,
        };
        let content_type = part
            .content_type()
            .map(|ct| match &ct.c_subtype {
                Some(sub) => format!("{}/{}", ct.c_type, sub),
                None => ct.c_type.to_string(),
            })
            .map(|t| clean(t.trim()).to_ascii_lowercase())
            .filter(|t| t.contains('/'))
            .unwrap_or_else(|| fallback_type.to_owned());
        let content_id = part
            .content_id()
            .map(|c| clean(c.trim().trim_start_matches('<').trim_end_matches('>')));
        let content_id = content_id.filter(|c| !c.is_empty());
        let inline = match part.content_disposition() {
            Some(d) => d.is_inline(),
            None => content_id.is_some() || matches!(part.body, PartType::InlineBinary(_)),
        };
        let filename = part
            .attachment_name()
            .map(|n| clean(n.trim()))
            .filter(|n| !n.is_empty());
        let data = match &mut part.body {
            PartType::Binary(b) | PartType::InlineBinary(b) => std::mem::take(b).into_owned(),
            PartType::Text(t) | PartType::Html(t) => std::mem::take(t).into_owned().into_bytes(),
            PartType::Message(inner) => inner.raw_message.to_vec(),
            PartType::Multipart(_) => continue,
        };
        out.push(ParsedAttachment {
            filename,
            content_type,
            content_id,
            inline,
            data,
        });
    }
    out
}

/// Message-IDs in a header value, without angle brackets.
fn ids(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Text(t) => message_id(t).into_iter().collect(),
        HeaderValue::TextList(l) => l.iter().filter_map(|t| message_id(t)).collect(),
        _ => Vec::new(),
    }
}

fn message_id(s: &str) -> Option<String> {
    let id = clean(
        s.trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .trim(),
    );
    (!id.is_empty()).then_some(id)
}

fn first_mailbox(a: &Address<'_>) -> Option<Mailbox> {
    mailboxes(a).into_iter().next()
}

fn mailboxes(a: &Address<'_>) -> Vec<Mailbox> {
    let addrs: Vec<&mail_parser::Addr<'_>> = match a {
        Address::List(l) => l.iter().collect(),
        Address::Group(g) => g.iter().flat_map(|g| g.addresses.iter()).collect(),
    };
    addrs
        .into_iter()
        .map(|a| Mailbox {
            name: a
                .name
                .as_deref()
                .map(|n| clean(n.trim()))
                .filter(|n| !n.is_empty()),
            address: a
                .address
                .as_deref()
                .map(|n| clean(n.trim()))
                .filter(|n| !n.is_empty()),
        })
        .filter(|m| m.name.is_some() || m.address.is_some())
        .collect()
}

/// Removes NUL characters, which PostgreSQL text and JSON columns reject.
fn clean(s: &str) -> String {
    s.replace('\0', "")
}

/// A raw header value on one line: folding line breaks removed, ends trimmed.
fn unfold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for line in s.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        out.push_str(line);
    }
    clean(out.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_headers_is_unparsable() {
        assert!(
            parse_mail(b"\r\n\r\njust a body\r\n")
                .unwrap_err()
                .contains("no header")
        );
        assert!(parse_mail(b"").is_err());
        assert!(
            parse_mail(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01binary")
                .unwrap_err()
                .contains("no header")
        );
        assert!(parse_mail(b"just text\nmore text\n").is_err());
    }

    #[test]
    fn latin1_header_lines_are_repaired() {
        let raw = b"From: Fran\xe7ois <f@example.fr>\nSubject: r\xe9ception\nContent-Type: text/plain; charset=iso-8859-1\n\nbody\n";
        let m = parse_mail(raw).unwrap();
        assert_eq!(m.subject.as_deref(), Some("réception"));
        assert_eq!(m.from.unwrap().name.as_deref(), Some("François"));
    }

    #[test]
    fn ids_lose_brackets_and_nul() {
        let raw = b"From: a@b.c\nMessage-ID: <x\x00y@b.c>\nIn-Reply-To: <p@b.c>\nReferences: <r1@b.c> <p@b.c>\n\nbody\n";
        let m = parse_mail(raw).unwrap();
        assert_eq!(m.message_id.as_deref(), Some("xy@b.c"));
        assert_eq!(m.in_reply_to.as_deref(), Some("p@b.c"));
        assert_eq!(m.references, vec!["r1@b.c".to_owned(), "p@b.c".to_owned()]);
    }
}
