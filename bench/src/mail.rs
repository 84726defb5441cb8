//! Realistic customer mail for the benchmarks: RFC 5322 headers (Message-ID, Date, From/To, Received, …) and a
//! `multipart/alternative` body with a `text/plain` and a `text/html` part, of a chosen size, from many senders,
//! with varied text (English and German, some non-ASCII) and about one reply in ten that threads onto an earlier
//! mail of the same sender. Deterministic for a seed.

use std::fmt::Write as _;

use chrono::{Duration, Utc};
use rand::{Rng as _, RngCore as _, SeedableRng as _, rngs::StdRng, seq::IndexedRandom as _};

const FIRST: &[&str] = &[
    "Anna", "Ben", "Clara", "David", "Elif", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Karin",
    "Lukas", "Marie", "Nils", "Olga", "Paul", "Rosa", "Sven", "Tanja", "Uwe", "Vera", "Yusuf",
    "Zoë", "Jürgen", "Søren", "Chloé", "Mateo", "Priya", "Wei", "Aiko",
];
const LAST: &[&str] = &[
    "Müller",
    "Schmidt",
    "Schneider",
    "Fischer",
    "Weber",
    "Meyer",
    "Wagner",
    "Becker",
    "Hoffmann",
    "Koch",
    "Smith",
    "Johnson",
    "Brown",
    "Garcia",
    "Martin",
    "Rossi",
    "Novak",
    "Kowalski",
    "Nguyen",
    "Tanaka",
    "O'Brien",
    "Lindqvist",
    "Dubois",
    "Silva",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "example.org",
    "mail.example.net",
    "kunden.example.de",
    "shop.example",
    "outlook.example",
    "gmx.example",
    "web.example",
];
const TOPICS: &[&str] = &[
    "Order",
    "Invoice",
    "Delivery",
    "Refund request",
    "Question about my contract",
    "Password reset does not work",
    "Rechnung",
    "Lieferung verspätet",
    "Kündigung",
    "Change of address",
    "Damaged item",
    "Warranty claim",
    "Subscription",
    "Login problem",
    "Payment failed",
    "Rücksendung",
];
const WORDS: &[&str] = &[
    "order",
    "delivery",
    "invoice",
    "account",
    "customer",
    "number",
    "please",
    "could",
    "you",
    "check",
    "the",
    "status",
    "of",
    "my",
    "package",
    "which",
    "was",
    "supposed",
    "to",
    "arrive",
    "last",
    "week",
    "unfortunately",
    "nothing",
    "has",
    "happened",
    "since",
    "then",
    "and",
    "I",
    "would",
    "like",
    "a",
    "refund",
    "or",
    "replacement",
    "as",
    "soon",
    "possible",
    "thank",
    "for",
    "your",
    "help",
    "contract",
    "payment",
    "card",
    "charged",
    "twice",
    "address",
    "changed",
    "tracking",
    "link",
    "does",
    "not",
    "work",
    "anymore",
    "support",
    "team",
    "phone",
    "call",
    "yesterday",
    "promised",
    "me",
    "an",
    "answer",
    "within",
    "two",
    "days",
    "Bestellung",
    "Lieferung",
    "Rechnung",
    "bitte",
    "prüfen",
    "Sie",
    "den",
    "Status",
    "meiner",
    "Sendung",
    "leider",
    "ist",
    "nichts",
    "passiert",
    "Rückerstattung",
    "möglichst",
    "bald",
    "vielen",
    "Dank",
    "für",
    "Ihre",
    "Hilfe",
    "Grüße",
    "Kundennummer",
    "Adresse",
    "geändert",
    "zweimal",
    "abgebucht",
    "weekend",
    "store",
    "manager",
    "email",
    "attached",
    "screenshot",
    "error",
    "message",
    "app",
    "website",
    "checkout",
    "voucher",
    "discount",
    "code",
    "expired",
    "today",
];

/// One generated mail.
#[derive(Debug, Clone)]
pub struct Mail {
    pub raw: Vec<u8>,
    pub subject: String,
    /// Without angle brackets.
    pub message_id: String,
}

/// A sender and a mail of theirs that a later reply can thread onto.
struct Earlier {
    from: String,
    name: String,
    subject: String,
    message_id: String,
}

/// Generates mail of about `target` bytes each.
pub struct MailGen {
    rng: StdRng,
    target: usize,
    seq: u64,
    recent: Vec<Earlier>,
    /// Mails per sender address before the next sender (the engine's default sender limit is 30 in 10 minutes).
    per_sender: u64,
    tag: String,
}

impl MailGen {
    /// `target`: the size of a mail in bytes; `seed` makes the run repeatable.
    pub fn new(seed: u64, target: usize) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            target,
            seq: 0,
            recent: Vec::new(),
            per_sender: 4,
            tag: format!("{seed:x}"),
        }
    }

    /// Replies off: every mail opens a contact (for latency runs, where each mail must become claimable).
    pub fn without_replies(mut self) -> Self {
        self.recent.clear();
        self.per_sender = 1;
        self.tag.push('n');
        self
    }

    /// The next mail to `to`.
    pub fn next_mail(&mut self, to: &str) -> Mail {
        let seq = self.seq;
        self.seq += 1;
        let rng = &mut self.rng;
        let reply = self.per_sender > 1 && self.recent.len() > 16 && rng.random_ratio(1, 10);
        let (from, name, subject, in_reply_to) = if reply {
            let earlier = &self.recent[rng.random_range(0..self.recent.len())];
            (
                earlier.from.clone(),
                earlier.name.clone(),
                format!("Re: {}", earlier.subject),
                Some(earlier.message_id.clone()),
            )
        } else {
            let sender = seq / self.per_sender;
            let first = FIRST.choose(rng).copied().unwrap_or("Anna");
            let last = LAST.choose(rng).copied().unwrap_or("Müller");
            let domain = DOMAINS[(sender % DOMAINS.len() as u64) as usize];
            let local: String = format!("{first}.{last}.{sender}")
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
                .collect::<String>()
                .to_ascii_lowercase();
            let topic = TOPICS.choose(rng).copied().unwrap_or("Order");
            let number = rng.random_range(100_000..999_999);
            (
                format!("{local}@{domain}"),
                format!("{first} {last}"),
                format!("{topic} #{number}"),
                None,
            )
        };
        let domain = from.rsplit_once('@').map_or("example.com", |(_, d)| d);
        let message_id = format!(
            "{:08x}.{seq}.{}@{domain}",
            rng.next_u32(),
            self.tag.as_str()
        );
        let date = Utc::now() - Duration::seconds(rng.random_range(0..86_400));
        let boundary = format!("=_mq_{:016x}", rng.next_u64());
        let paragraphs = self.paragraphs(&name);

        let mut head = String::with_capacity(1024);
        let received_ip = format!(
            "192.0.2.{}",
            (seq % 250) + 1 // TEST-NET-1: documentation addresses, never contacted
        );
        let _ = write!(
            head,
            "Return-Path: <{from}>\r\n\
             Received: from mx.{domain} ({received_ip}) by mx.contoso.example with ESMTPS id {:x};\r\n\
             \x20{}\r\n\
             From: {} <{from}>\r\n\
             To: <{to}>\r\n\
             Subject: {}\r\n\
             Date: {}\r\n\
             Message-ID: <{message_id}>\r\n",
            self.rng.next_u64(),
            date.format("%a, %d %b %Y %H:%M:%S +0000"),
            encode_word(&name),
            encode_word(&subject),
            date.format("%a, %d %b %Y %H:%M:%S +0000"),
        );
        if let Some(parent) = &in_reply_to {
            let _ = write!(
                head,
                "In-Reply-To: <{parent}>\r\nReferences: <{parent}>\r\n"
            );
        }
        let _ = write!(
            head,
            "MIME-Version: 1.0\r\n\
             X-Mailer: Benchmark Mail Client 1.{}\r\n\
             Content-Language: {}\r\n\
             Content-Type: multipart/alternative; boundary=\"{boundary}\"\r\n\r\n\
             This is a multi-part message in MIME format.\r\n\r\n",
            seq % 7,
            if subject.contains(['ü', 'ä', 'ö']) {
                "de-DE"
            } else {
                "en-US"
            },
        );
        let mut text = String::new();
        let mut html = String::from(
            "<html><head><meta http-equiv=\"Content-Type\" content=\"text/html; charset=utf-8\">\r\n\
             <style>p { margin: 0 0 1em 0; font-family: Calibri, Arial, sans-serif; }</style></head>\r\n\
             <body><div dir=\"ltr\">\r\n",
        );
        for p in &paragraphs {
            wrap_into(&mut text, p, 72);
            text.push_str("\r\n");
            html.push_str("<p>");
            wrap_into(&mut html, &escape_html(p), 76);
            html.push_str("</p>\r\n");
        }
        html.push_str("</div></body></html>\r\n");
        let mut raw = head.into_bytes();
        for (kind, body) in [("plain", text), ("html", html)] {
            raw.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Type: text/{kind}; charset=utf-8\r\n\
                     Content-Transfer-Encoding: 8bit\r\n\r\n"
                )
                .as_bytes(),
            );
            raw.extend_from_slice(body.as_bytes());
        }
        raw.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());

        if !reply {
            self.recent.push(Earlier {
                from,
                name,
                subject: subject.clone(),
                message_id: message_id.clone(),
            });
            if self.recent.len() > 256 {
                self.recent.remove(0);
            }
        }
        Mail {
            raw,
            subject,
            message_id,
        }
    }

    /// Greeting, paragraphs of about `target` bytes in all (the text appears twice: plain and HTML), signature.
    fn paragraphs(&mut self, name: &str) -> Vec<String> {
        let rng = &mut self.rng;
        let budget = self.target.saturating_sub(1500) / 2;
        let greeting = [
            "Hello support team,",
            "Dear Sir or Madam,",
            "Guten Tag,",
            "Hi,",
        ]
        .choose(rng)
        .copied()
        .unwrap_or("Hello,");
        let mut out = vec![greeting.to_owned()];
        let mut len = greeting.len();
        let closing = format!(
            "Kind regards / Viele Grüße\r\n{name}\r\nCustomer number {}\r\nPhone +49 30 {}",
            rng.random_range(10_000_000..99_999_999u32),
            rng.random_range(1_000_000..9_999_999u32)
        );
        while len + closing.len() < budget {
            let mut paragraph = String::new();
            for _ in 0..rng.random_range(2..6) {
                let words = rng.random_range(8..18);
                for w in 0..words {
                    let word = WORDS.choose(rng).copied().unwrap_or("order");
                    if w == 0 {
                        let mut chars = word.chars();
                        if let Some(c) = chars.next() {
                            paragraph.extend(c.to_uppercase());
                            paragraph.push_str(chars.as_str());
                        }
                    } else {
                        paragraph.push(' ');
                        paragraph.push_str(word);
                    }
                }
                if rng.random_ratio(1, 5) {
                    let _ = write!(
                        paragraph,
                        " (order {}-{})",
                        rng.random_range(1000..9999),
                        rng.random_range(10..99)
                    );
                }
                paragraph.push_str(". ");
            }
            let paragraph = paragraph.trim_end().to_owned();
            len += paragraph.len() + 2;
            out.push(paragraph);
        }
        out.push(closing);
        out
    }
}

/// Writes one large mail of about `bytes` bytes to `out`, a line at a time (the whole mail is never in memory): a
/// short text and a base64 attachment of random (incompressible) data. Returns the bytes written.
pub fn write_large_mail(
    out: &mut dyn std::io::Write,
    to: &str,
    bytes: usize,
    seed: u64,
) -> std::io::Result<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let message_id = format!("large.{:016x}@example.com", rng.next_u64());
    let subject = format!("Scanned documents ({} MB)", bytes / (1024 * 1024));
    let boundary = format!("=_mq_{:016x}", rng.next_u64());
    let head = format!(
        "From: Large Sender <large.sender@example.com>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\
         Date: {}\r\nMessage-ID: <{message_id}>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n\
         --{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         Hello, please find the scanned documents attached.\r\n\r\n\
         --{boundary}\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\n\
         Content-Disposition: attachment; filename=\"scan.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n",
        Utc::now().format("%a, %d %b %Y %H:%M:%S +0000"),
    );
    let trailer = format!("\r\n--{boundary}--\r\n");
    out.write_all(head.as_bytes())?;
    // 57 raw bytes make a line of 76 base64 characters plus CRLF.
    let lines = bytes.saturating_sub(head.len() + trailer.len()) / 78;
    let mut chunk = [0u8; 57];
    let mut line = Vec::with_capacity(78);
    for _ in 0..lines {
        rng.fill_bytes(&mut chunk);
        line.clear();
        base64_line(&chunk, &mut line);
        line.extend_from_slice(b"\r\n");
        out.write_all(&line)?;
    }
    out.write_all(trailer.as_bytes())?;
    Ok((head.len() + lines * 78 + trailer.len()) as u64)
}

fn base64_line(data: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for group in data.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]);
            } else {
                out.push(b'=');
            }
        }
    }
}

/// An RFC 2047 encoded word (base64, UTF-8) when the text is not plain ASCII; quoted otherwise.
fn encode_word(text: &str) -> String {
    if text.is_ascii() {
        if text.contains(['"', '\\', ',', '(', ')', '<', '>', '@', ':', ';', '\'']) {
            format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
        } else {
            text.to_owned()
        }
    } else {
        let mut encoded = Vec::new();
        base64_line(text.as_bytes(), &mut encoded);
        format!("=?utf-8?B?{}?=", String::from_utf8_lossy(&encoded))
    }
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace("\r\n", "<br>\r\n")
}

/// Appends `text` wrapped at spaces to lines of at most `width` bytes (longer words stay whole), CRLF-terminated.
fn wrap_into(out: &mut String, text: &str, width: usize) {
    for line in text.split("\r\n") {
        let mut len = 0;
        for word in line.split(' ').filter(|w| !w.is_empty()) {
            if len > 0 && len + 1 + word.len() > width {
                out.push_str("\r\n");
                len = 0;
            } else if len > 0 {
                out.push(' ');
                len += 1;
            }
            out.push_str(word);
            len += word.len();
        }
        out.push_str("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mails_are_about_the_target_size_and_parse() {
        let mut generator = MailGen::new(7, 6 * 1024);
        let mails: Vec<Mail> = (0..200)
            .map(|_| generator.next_mail("queue@contoso.com"))
            .collect();
        let average = mails.iter().map(|m| m.raw.len()).sum::<usize>() / mails.len();
        assert!((5000..7500).contains(&average), "{average}");
        let replies = mails
            .iter()
            .filter(|m| m.subject.starts_with("Re: "))
            .count();
        assert!(replies > 0 && replies < 50, "{replies}");
        for m in &mails {
            let text = String::from_utf8(m.raw.clone()).unwrap();
            assert!(text.lines().all(|l| l.len() < 998));
            assert!(text.contains(&format!("Message-ID: <{}>", m.message_id)));
        }
    }

    #[test]
    fn large_mail_has_the_size_asked_for() {
        let mut raw = Vec::new();
        let written = write_large_mail(&mut raw, "queue@contoso.com", 2 * 1024 * 1024, 1).unwrap();
        let size = raw.len();
        assert_eq!(written, size as u64);
        assert!(
            size <= 2 * 1024 * 1024 && size > 2 * 1024 * 1024 - 200,
            "{size}"
        );
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        let mut out = Vec::new();
        base64_line("Zoë".as_bytes(), &mut out);
        assert_eq!(out, b"Wm/Dqw==");
    }
}
