//! Resolving `{ env: NAME }` / `{ file: PATH }` secrets. Messages name the variable or file, never a value.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use crate::{
    Config, Secret, SecretSource,
    tree::{Node, Pos, kept, pair},
    validate::Findings,
};

/// One secret of the configuration: where it is and what it belongs to (for messages).
struct Slot<'a> {
    secret: &'a mut Secret,
    pos: Pos,
    what: String,
}

/// Reads every secret's value into the config. Relative files resolve against `base_dir`.
pub(crate) fn resolve(
    config: &mut Config,
    root: &Node,
    poisoned: &HashSet<usize>,
    base_dir: &Path,
    findings: &mut Findings,
) {
    for slot in slots(config, root, poisoned) {
        if matches!(slot.secret.source(), SecretSource::Inline(_)) {
            findings.warn(
                slot.pos,
                format!("{} is written inline in the file; store it in an env var (`{{ env: NAME }}`) or a file (`{{ file: PATH }}`)", slot.what),
            );
        }
        match read(slot.secret.source(), base_dir) {
            Ok(value) if value.is_empty() => {
                findings.error(
                    slot.pos,
                    format!("{} is empty ({})", slot.what, slot.secret.origin()),
                );
            }
            Ok(value) => slot.secret.set_value(value),
            Err(e) => findings.error(slot.pos, format!("{}: {e}", slot.what)),
        }
    }
}

/// The value of one secret; the error names the variable or file only.
fn read(source: &SecretSource, base_dir: &Path) -> Result<String, String> {
    match source {
        SecretSource::Inline(value) => Ok(value.clone()),
        SecretSource::Env { env } => std::env::var(env).map_err(|e| match e {
            std::env::VarError::NotPresent => format!("environment variable `{env}` is not set"),
            std::env::VarError::NotUnicode(_) => {
                format!("environment variable `{env}` is not valid UTF-8")
            }
        }),
        SecretSource::File { file } => {
            let path = resolve_path(file, base_dir);
            // io::Error messages never contain file contents.
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read secret file `{}`: {e}", path.display()))?;
            Ok(text.trim_end_matches(['\n', '\r']).to_string())
        }
    }
}

/// A relative path is relative to the configuration file's directory, not the working directory.
pub(crate) fn resolve_path(file: &Path, base_dir: &Path) -> PathBuf {
    if file.is_absolute() {
        file.to_path_buf()
    } else {
        base_dir.join(file)
    }
}

/// Every secret in the config, paired with its position.
fn slots<'a>(config: &'a mut Config, root: &'a Node, poisoned: &HashSet<usize>) -> Vec<Slot<'a>> {
    let mut slots = Vec::new();
    let mut add = |secret: &'a mut Secret, node: &Node, key: &str, what: String| {
        slots.push(Slot {
            secret,
            pos: node.pos_of(key),
            what,
        });
    };

    let api = root.get("api").unwrap_or(root);
    for (token, node) in pair(
        &mut config.api.tokens,
        kept(api.get("tokens"), poisoned),
        api,
    ) {
        add(
            &mut token.secret,
            node,
            "secret",
            format!("the secret of API token `{}`", token.name),
        );
    }
    let servers = kept(root.get("incoming_servers"), poisoned);
    for (server, node) in pair(&mut config.incoming_servers, servers, root) {
        if let Some(secret) = &mut server.client_secret {
            add(
                secret,
                node,
                "client_secret",
                format!("the client_secret of incoming server `{}`", server.name),
            );
        }
    }
    if let Some(out) = &mut config.outgoing_server {
        let node = root.get("outgoing_server").unwrap_or(root);
        if let Some(secret) = &mut out.client_secret {
            add(
                secret,
                node,
                "client_secret",
                "the client_secret of the outgoing server".into(),
            );
        }
        if let Some(secret) = &mut out.password {
            add(
                secret,
                node,
                "password",
                "the password of the outgoing server".into(),
            );
        }
    }
    for (queue, qnode) in pair(&mut config.queues, kept(root.get("queues"), poisoned), root) {
        for (address, node) in pair(
            &mut queue.addresses,
            kept(qnode.get("addresses"), poisoned),
            qnode,
        ) {
            if let Some(secret) = &mut address.password {
                add(
                    secret,
                    node,
                    "password",
                    format!("the password of address `{}`", address.address),
                );
            }
        }
    }
    slots
}
