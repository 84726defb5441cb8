//! The deployment files: docker-compose.yml, the Dockerfile, .dockerignore, and the configurations that the compose
//! file and `scripts/quickstart` run with. Docker does not run on the test machines, so these tests read the files and
//! check that they fit together: services, health checks, replicas, mounts, secrets, and configurations that load.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use mailqueue_config::{DatabaseKind, Loaded, Role};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn compose() -> Value {
    serde_saphyr::from_str::<Value>(&read("docker-compose.yml"))
        .unwrap_or_else(|e| panic!("docker-compose.yml is not valid YAML: {e}"))
}

#[track_caller]
fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service `{name}`"))
}

/// The strings of a compose list, or of a single string (`command`, `entrypoint`, `healthcheck.test` take both).
fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// One entry of a service's `volumes`, short (`SRC:DST[:ro]`) or long syntax.
#[derive(Debug)]
struct Mount {
    source: String,
    target: String,
    read_only: bool,
}

fn mounts(service: &Value) -> Vec<Mount> {
    let Some(volumes) = service["volumes"].as_array() else {
        return Vec::new();
    };
    volumes
        .iter()
        .map(|v| match v {
            Value::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                assert!(parts.len() >= 2, "volume `{s}` has no target");
                Mount {
                    source: parts[0].to_owned(),
                    target: parts[1].to_owned(),
                    read_only: parts
                        .get(2)
                        .is_some_and(|m| m.split(',').any(|o| o == "ro")),
                }
            }
            long => Mount {
                source: long["source"].as_str().unwrap_or_default().to_owned(),
                target: long["target"].as_str().unwrap_or_default().to_owned(),
                read_only: long["read_only"].as_bool().unwrap_or(false),
            },
        })
        .collect()
}

/// The names of the secrets a service lists (short or long syntax).
fn service_secrets(service: &Value) -> BTreeSet<String> {
    service["secrets"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|s| {
                    s.as_str()
                        .or_else(|| s["source"].as_str())
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every `NAME` of `/run/secrets/NAME` in `text` (a bare `/run/secrets/`, as in prose, names nothing).
fn secret_refs(text: &str) -> BTreeSet<String> {
    text.match_indices("/run/secrets/")
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || "_.-".contains(c)))
                .unwrap_or(rest.len());
            rest[..end].to_owned()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// The value after `--config` in a command.
fn config_arg(command: &[String]) -> Option<&str> {
    command
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| command.get(i + 1))
        .map(String::as_str)
}

#[test]
fn services_postgres_and_engine_exist() {
    let c = compose();
    service(&c, "postgres");
    service(&c, "engine");
}

#[test]
fn postgres_is_16_with_a_health_check_and_a_named_volume() {
    let c = compose();
    let pg = service(&c, "postgres");
    let image = pg["image"].as_str().expect("postgres has an image");
    assert!(
        image.starts_with("postgres:16"),
        "postgres image is `{image}`, expected postgres:16"
    );

    let test = strings(&pg["healthcheck"]["test"]);
    assert!(
        test.iter().any(|t| t.contains("pg_isready")),
        "postgres health check does not run pg_isready: {test:?}"
    );

    let data = mounts(pg)
        .into_iter()
        .find(|m| m.target == "/var/lib/postgresql/data")
        .expect("postgres mounts a volume at /var/lib/postgresql/data");
    assert!(
        c["volumes"].get(&data.source).is_some(),
        "postgres data `{}` is not a named volume declared under top-level `volumes`",
        data.source
    );
}

#[test]
fn engine_builds_from_the_dockerfile_runs_twice_after_postgres_is_healthy() {
    let c = compose();
    let engine = service(&c, "engine");

    let (context, dockerfile) = match &engine["build"] {
        Value::String(context) => (context.clone(), "Dockerfile".to_owned()),
        build => (
            build["context"]
                .as_str()
                .expect("engine.build has a context")
                .to_owned(),
            build["dockerfile"]
                .as_str()
                .unwrap_or("Dockerfile")
                .to_owned(),
        ),
    };
    let dockerfile = root().join(&context).join(&dockerfile);
    assert!(
        dockerfile.is_file(),
        "engine builds from {}, which does not exist",
        dockerfile.display()
    );
    assert_eq!(
        dockerfile.canonicalize().unwrap(),
        root().join("Dockerfile").canonicalize().unwrap()
    );

    assert_eq!(
        engine["deploy"]["replicas"].as_u64(),
        Some(2),
        "engine.deploy.replicas"
    );
    assert_eq!(
        engine["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy"),
        "engine must wait for postgres to be healthy"
    );
    assert!(
        engine.get("container_name").is_none(),
        "a container_name would stop compose from running two replicas"
    );
}

#[test]
fn engine_mounts_the_compose_config_read_only_where_serve_reads_it() {
    let c = compose();
    let engine = service(&c, "engine");
    let config = mounts(engine)
        .into_iter()
        .find(|m| m.source.ends_with("config/examples/compose.yaml"))
        .expect("engine mounts ./config/examples/compose.yaml");
    assert!(
        config.read_only,
        "the configuration is mounted read-only (`:ro`)"
    );
    assert!(
        root().join(&config.source).is_file(),
        "{} does not exist",
        config.source
    );

    // `command` overrides the image's CMD; without it the Dockerfile's CMD applies.
    let command = match strings(&engine["command"]) {
        command if !command.is_empty() => command,
        _ => dockerfile_json_array("CMD"),
    };
    assert_eq!(
        config_arg(&command),
        Some(config.target.as_str()),
        "serve --config must name the mounted file"
    );
}

#[test]
fn every_secret_the_engine_reads_is_a_compose_secret_file_under_secrets() {
    let c = compose();
    let engine = service(&c, "engine");
    let listed = service_secrets(engine);

    let mut wanted = secret_refs(&read("config/examples/compose.yaml"));
    wanted.extend(
        strings(&engine["entrypoint"])
            .iter()
            .flat_map(|e| secret_refs(e)),
    );
    assert!(
        wanted.contains("postgres_password"),
        "the engine reads the database password from its secret"
    );
    for name in &wanted {
        assert!(
            listed.contains(name),
            "the engine reads /run/secrets/{name} but does not list secret `{name}`"
        );
    }

    let pg = service(&c, "postgres");
    let pg_file = pg["environment"]["POSTGRES_PASSWORD_FILE"]
        .as_str()
        .expect("postgres takes POSTGRES_PASSWORD_FILE");
    for name in secret_refs(pg_file) {
        assert!(
            service_secrets(pg).contains(&name),
            "postgres reads /run/secrets/{name} but does not list it"
        );
    }

    for name in listed.iter().chain(&service_secrets(pg)) {
        let file = c["secrets"][name.as_str()]["file"]
            .as_str()
            .unwrap_or_else(|| panic!("top-level secret `{name}` is missing or has no `file`"));
        assert!(
            file.starts_with("./secrets/"),
            "secret `{name}` comes from `{file}`, expected ./secrets/…"
        );
    }
}

/// A JSON-array instruction of the Dockerfile (`ENTRYPOINT`, `CMD`), from its last stage.
fn dockerfile_json_array(instruction: &str) -> Vec<String> {
    let prefix = format!("{instruction} ");
    let line = read("Dockerfile")
        .lines()
        .rev()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("the Dockerfile has no {instruction}"))
        .to_owned();
    serde_json::from_str(&line[prefix.len()..])
        .unwrap_or_else(|e| panic!("{instruction} is not a JSON array: {e}"))
}

#[test]
fn dockerfile_builds_mailqueue_engine_and_runs_it_as_a_user() {
    let dockerfile = read("Dockerfile");
    let from: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(
        from.first()
            .is_some_and(|l| l.starts_with("FROM rust:1.95-bookworm")),
        "builder stage: {from:?}"
    );
    assert!(
        from.last()
            .is_some_and(|l| l.starts_with("FROM debian:bookworm-slim")),
        "runtime stage: {from:?}"
    );
    assert!(
        dockerfile.contains("cargo build --release --locked -p mailqueue-engine"),
        "the Dockerfile builds the mailqueue-engine package"
    );

    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    let user = runtime
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert!(
        !matches!(user.trim(), "root" | "0" | "0:0"),
        "the engine must not run as root (USER {user})"
    );
    assert!(
        runtime.lines().any(|l| l.trim() == "EXPOSE 8080"),
        "the runtime stage exposes 8080"
    );
    assert!(
        runtime.contains("HEALTHCHECK") && runtime.contains("/healthz"),
        "the image checks /healthz"
    );

    assert_eq!(dockerfile_json_array("ENTRYPOINT"), ["mailqueue"]);
    assert_eq!(
        dockerfile_json_array("CMD"),
        ["serve", "--config", "/etc/mailqueue/mailqueue.yaml"]
    );
}

#[test]
fn dockerignore_keeps_local_state_and_secrets_out_of_the_build() {
    let ignored: BTreeSet<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_owned())
        .collect();
    for entry in ["target", "data", ".git", "secrets"] {
        assert!(
            ignored.contains(entry),
            ".dockerignore does not exclude `{entry}`"
        );
    }
}

/// Loads a configuration file of the repository with its secrets redirected to files in a temp dir: `/run/secrets/X`
/// and `{ env: X }` become files named X holding `value-of-X`. Fails on any error.
fn load_with_fake_secrets(rel: &str) -> (Loaded, BTreeSet<String>) {
    let dir = tempfile::tempdir().unwrap();
    let base = format!("{}/", dir.path().display());
    let mut text = read(rel).replace("/run/secrets/", &base);
    let mut names = secret_refs(&read(rel));
    // `{ env: NAME }` -> `{ file: <dir>/NAME }`
    while let Some(i) = text.find("{ env: ") {
        let end = i + text[i..].find('}').expect("`{ env: NAME }` is closed");
        let name = text[i + "{ env: ".len()..end].trim().to_owned();
        text.replace_range(i..=end, &format!("{{ file: {base}{name} }}"));
        names.insert(name);
    }
    for name in &names {
        fs::write(dir.path().join(name), format!("value-of-{name}\n")).unwrap();
    }
    let loaded = mailqueue_config::load_str(&root().join(rel), &text)
        .unwrap_or_else(|e| panic!("{rel} does not load (secrets redirected to {base}):\n{e}"));
    (loaded, names)
}

#[test]
fn compose_config_loads_for_postgres_on_all_interfaces() {
    let (loaded, _) = load_with_fake_secrets("config/examples/compose.yaml");
    let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings.is_empty(),
        "config/examples/compose.yaml has warnings:\n{}",
        warnings.join("\n")
    );
    let config = loaded.config;
    assert_eq!(
        config.database.url,
        "postgres://mailqueue@postgres:5432/mailqueue"
    );
    assert_eq!(config.database.kind(), Some(DatabaseKind::Postgres));
    assert_eq!(
        config.api.listen, "0.0.0.0:8080",
        "the API must be reachable from outside the container"
    );
    for role in [Role::Agent, Role::Router, Role::Admin] {
        assert!(
            config.api.tokens.iter().any(|t| t.role == role),
            "no {role:?} token"
        );
    }
}

#[test]
fn offline_config_loads_and_contacts_no_server() {
    let (loaded, names) = load_with_fake_secrets("config/examples/offline.yaml");
    let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings.is_empty(),
        "config/examples/offline.yaml has warnings:\n{}",
        warnings.join("\n")
    );

    let header = read("config/examples/offline.yaml");
    for name in &names {
        assert!(
            header.contains(&format!("export {name}=")) || header.contains(&format!(" {name}=")),
            "offline.yaml reads `{name}`, which its header does not tell the reader to export"
        );
    }
    assert!(
        loaded.config.incoming_servers.iter().all(|s| !s.enabled),
        "the offline example must not contact any mail server"
    );

    let config = loaded.config;
    assert_eq!(
        config.database.url, "sqlite://data/mailqueue.db",
        "the offline example writes only below ./data/"
    );
    let support = config.queue("support").expect("queue support");
    assert_eq!(support.addresses.len(), 2, "support has two addresses");
    assert!(config.queue("sales").is_some(), "queue sales");
    let alice = config
        .api
        .tokens
        .iter()
        .find(|t| t.name == "alice")
        .expect("token alice");
    assert_eq!(alice.role, Role::Agent);
    assert!(
        alice.queues.iter().any(|q| q == "support"),
        "alice serves support, where the sample mail goes"
    );
    for role in [Role::Router, Role::Admin] {
        assert!(
            config.api.tokens.iter().any(|t| t.role == role),
            "no {role:?} token"
        );
    }
}
