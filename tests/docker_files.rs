//! Proves the container files hang together without Docker: docker/compose.yml runs Redis
//! (noeviction, AOF), two creditd nodes on it, nginx, Prometheus and Grafana, from files that
//! exist; the Dockerfile is multi-stage, non-root and health-checked by `creditd healthcheck`;
//! and the configs agree with each other on names, ports, paths and the Grafana datasource.

mod common;

use common::yaml;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

const COMPOSE: &str = "docker/compose.yml";
const DOCKERFILE: &str = "docker/Dockerfile";

/// A list of strings from a compose field written as a list or as one string.
fn words(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Value::Null => Vec::new(),
        other => panic!("expected a string or a list, got {other}"),
    }
}

/// A service's environment, written as a mapping or as a list of `KEY=VALUE`.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// True when the value that follows `flag` in `args` is `value`.
fn flag_is(args: &[String], flag: &str, value: &str) -> bool {
    args.windows(2).any(|w| w[0] == flag && w[1] == value)
        || args.iter().any(|a| *a == format!("{flag}={value}"))
}

/// `path` relative to `base`, normalised (`..` resolved), for files of the repository.
fn resolve(base: &Path, path: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in base.join(path).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// A volume entry as (source, target): short `src:dst[:mode]` or long `{source, target}`.
fn volume(entry: &Value) -> (String, String) {
    match entry {
        Value::String(s) => {
            let mut parts = s.splitn(3, ':');
            let source = parts.next().unwrap_or_default().to_string();
            let target = parts.next().unwrap_or_default().to_string();
            (source, target)
        }
        Value::Object(m) => (
            m.get("source")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            m.get("target")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        ),
        other => panic!("unexpected volume entry {other}"),
    }
}

fn is_bind(source: &str) -> bool {
    source.starts_with('.') || source.starts_with('/') || source.starts_with('~')
}

/// The bind mounts of every service: (service, host path resolved in the repo, target).
fn bind_mounts(compose: &Value, compose_dir: &Path) -> Vec<(String, PathBuf, String)> {
    let mut out = Vec::new();
    for (name, service) in compose["services"].as_object().expect("services") {
        for entry in service["volumes"].as_array().into_iter().flatten() {
            let (source, target) = volume(entry);
            if is_bind(&source) {
                out.push((name.clone(), resolve(compose_dir, &source), target));
            }
        }
    }
    out
}

/// The services built from docker/Dockerfile (the creditd nodes).
fn creditd_services(compose: &Value, compose_dir: &Path) -> Vec<(String, Value)> {
    let dockerfile = yaml::repo_path(DOCKERFILE);
    compose["services"]
        .as_object()
        .expect("services")
        .iter()
        .filter(|(_, s)| {
            let build = &s["build"];
            let context = build["context"].as_str().or(build.as_str());
            let file = build["dockerfile"].as_str().unwrap_or("Dockerfile");
            context.is_some_and(|c| resolve(&resolve(compose_dir, c), file) == dockerfile)
        })
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect()
}

#[test]
fn compose_runs_redis_two_creditd_nodes_nginx_prometheus_and_grafana() {
    let compose = yaml::load(COMPOSE);
    let compose_dir = yaml::repo_path("docker");
    let services = compose["services"].as_object().expect("services");
    for name in ["redis", "nginx", "prometheus", "grafana"] {
        assert!(
            services.contains_key(name),
            "{COMPOSE} has no service {name}"
        );
    }

    // Redis must refuse writes rather than evict balances, and keep an append-only file.
    let redis_args = words(&services["redis"]["command"]);
    assert!(
        flag_is(&redis_args, "--maxmemory-policy", "noeviction"),
        "redis command {redis_args:?} lacks --maxmemory-policy noeviction"
    );
    assert!(
        flag_is(&redis_args, "--appendonly", "yes"),
        "redis command {redis_args:?} lacks --appendonly yes"
    );

    // Two creditd nodes, built from docker/Dockerfile, on that Redis, with their own ids.
    let nodes = creditd_services(&compose, &compose_dir);
    assert_eq!(
        nodes.len(),
        2,
        "expected two services built from {DOCKERFILE}, got {:?}",
        nodes.iter().map(|n| &n.0).collect::<Vec<_>>()
    );
    let mut ids = BTreeSet::new();
    for (name, service) in &nodes {
        let env = environment(service);
        assert_eq!(
            env.get("CREDITD_STORE").map(String::as_str),
            Some("redis"),
            "{name}: {env:?}"
        );
        let url = env.get("CREDITD_REDIS_URL").expect("CREDITD_REDIS_URL");
        let host = url
            .strip_prefix("redis://")
            .and_then(|r| r.split([':', '/']).next())
            .unwrap_or_else(|| panic!("{name}: CREDITD_REDIS_URL {url} is not redis://"));
        assert!(
            services.contains_key(host),
            "{name}: CREDITD_REDIS_URL names {host}, not a service"
        );
        assert!(
            env.get("CREDITD_ADMIN_TOKEN")
                .is_some_and(|t| !t.is_empty()),
            "{name}: no admin token"
        );
        let id = env.get("CREDITD_NODE_ID").expect("CREDITD_NODE_ID").clone();
        assert!(ids.insert(id.clone()), "{name}: node id {id} used twice");
    }

    // Every dependency is a service; waiting for "healthy" needs a health check.
    let dockerfile = std::fs::read_to_string(yaml::repo_path(DOCKERFILE)).expect("Dockerfile");
    let image_has_healthcheck = dockerfile
        .lines()
        .any(|l| l.trim_start().starts_with("HEALTHCHECK"));
    let node_names: BTreeSet<&String> = nodes.iter().map(|n| &n.0).collect();
    for (name, service) in services {
        let deps: Vec<(String, Option<String>)> = match &service["depends_on"] {
            Value::Array(list) => list
                .iter()
                .filter_map(Value::as_str)
                .map(|d| (d.to_string(), None))
                .collect(),
            Value::Object(m) => m
                .iter()
                .map(|(d, v)| (d.clone(), v["condition"].as_str().map(str::to_string)))
                .collect(),
            _ => Vec::new(),
        };
        for (dep, condition) in deps {
            assert!(
                services.contains_key(&dep),
                "{name} depends on {dep}, not a service"
            );
            if condition.as_deref() == Some("service_healthy") {
                let has = services[&dep].get("healthcheck").is_some()
                    || (node_names.contains(&dep) && image_has_healthcheck);
                assert!(
                    has,
                    "{name} waits for {dep} to be healthy; it has no health check"
                );
            }
        }
    }

    // Named volumes are declared; bind mounts and build inputs exist in the repository.
    let declared: BTreeSet<&String> = compose["volumes"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    for (name, service) in services {
        for entry in service["volumes"].as_array().into_iter().flatten() {
            let (source, target) = volume(entry);
            assert!(target.starts_with('/'), "{name}: volume target {target:?}");
            if !is_bind(&source) {
                assert!(
                    declared.contains(&source),
                    "{name}: named volume {source} is not declared under volumes:"
                );
            }
        }
    }
    let mounts = bind_mounts(&compose, &compose_dir);
    assert!(mounts.len() >= 5, "only {} bind mounts", mounts.len());
    for (name, path, _) in &mounts {
        assert!(
            path.exists(),
            "{name} mounts {}, which is not in the repository",
            path.display()
        );
    }
    for (name, service) in services {
        let build = &service["build"];
        if build.is_null() {
            continue;
        }
        let context = resolve(
            &compose_dir,
            build["context"].as_str().or(build.as_str()).unwrap_or("."),
        );
        assert!(
            context.is_dir(),
            "{name}: build context {}",
            context.display()
        );
        let file = context.join(build["dockerfile"].as_str().unwrap_or("Dockerfile"));
        assert!(file.is_file(), "{name}: dockerfile {}", file.display());
    }
}

#[test]
fn the_configs_agree_on_names_ports_and_paths() {
    let compose = yaml::load(COMPOSE);
    let compose_dir = yaml::repo_path("docker");
    let services = compose["services"].as_object().expect("services");
    let mounts = bind_mounts(&compose, &compose_dir);
    let mounted = |service: &str, target: &str| -> Option<PathBuf> {
        mounts.iter().find_map(|(s, path, t)| {
            if s != service {
                return None;
            }
            if t == target {
                return Some(path.clone());
            }
            // A file inside a mounted folder.
            let rest = target.strip_prefix(t.as_str())?.strip_prefix('/')?;
            Some(path.join(rest))
        })
    };
    let listen_port = |service: &Value| -> Vec<String> {
        words(&service["ports"])
            .iter()
            .filter_map(|p| p.rsplit(':').next().map(str::to_string))
            .collect()
    };

    // creditd listens on 8787 in the image; the nodes publish it, nginx and Prometheus use it.
    let dockerfile = std::fs::read_to_string(yaml::repo_path(DOCKERFILE)).expect("Dockerfile");
    let image_port = dockerfile
        .split("CREDITD_LISTEN=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|l| l.rsplit(':').next())
        .expect("ENV CREDITD_LISTEN=host:port in the Dockerfile")
        .to_string();
    assert!(
        dockerfile.contains(&format!("EXPOSE {image_port}")),
        "the Dockerfile does not EXPOSE {image_port}"
    );
    let nodes = creditd_services(&compose, &compose_dir);
    for (name, service) in &nodes {
        assert_eq!(
            listen_port(service),
            std::slice::from_ref(&image_port),
            "{name} publishes another port than the image listens on"
        );
    }

    // nginx: its config is mounted where the image reads it, and its upstreams are the nodes.
    let nginx_conf = mounted("nginx", "/etc/nginx/nginx.conf").expect("nginx.conf mount");
    let nginx_text = std::fs::read_to_string(&nginx_conf).expect("nginx.conf");
    let upstreams: BTreeSet<String> = nginx_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("server "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|s| s.trim_end_matches(';').to_string())
        // `server {` blocks and the stand-in API on loopback are not creditd upstreams.
        .filter(|s| s.contains(':') && !s.starts_with("127.0.0.1"))
        .collect();
    let expected: BTreeSet<String> = nodes
        .iter()
        .map(|(n, _)| format!("{n}:{image_port}"))
        .collect();
    assert_eq!(
        upstreams, expected,
        "nginx's creditd upstream must list every node"
    );
    let nginx_ports = listen_port(&services["nginx"]);
    for port in &nginx_ports {
        assert!(
            nginx_text.contains(&format!("listen {port};")),
            "nginx publishes {port} but its config does not listen there"
        );
    }

    // Prometheus: its config and rule files are mounted where the command points; it scrapes
    // every node.
    let args = words(&services["prometheus"]["command"]);
    let config_path = args
        .iter()
        .find_map(|a| a.strip_prefix("--config.file="))
        .expect("--config.file");
    let config_file = mounted("prometheus", config_path).expect("prometheus.yml mount");
    let prom = yaml::load(
        config_file
            .strip_prefix(yaml::repo_path(""))
            .expect("in the repo")
            .to_str()
            .unwrap(),
    );
    let config_dir = Path::new(config_path).parent().expect("config folder");
    for rule_file in prom["rule_files"].as_array().expect("rule_files") {
        let target = config_dir.join(rule_file.as_str().expect("rule file"));
        let host = mounted("prometheus", target.to_str().unwrap())
            .unwrap_or_else(|| panic!("rule file {} is not mounted", target.display()));
        assert!(host.is_file(), "{}", host.display());
    }
    let mut scraped = BTreeSet::new();
    for job in prom["scrape_configs"].as_array().expect("scrape_configs") {
        for sc in job["static_configs"].as_array().into_iter().flatten() {
            for t in sc["targets"].as_array().into_iter().flatten() {
                scraped.insert(t.as_str().unwrap_or_default().to_string());
            }
        }
    }
    for target in &expected {
        assert!(
            scraped.contains(target),
            "Prometheus does not scrape {target}"
        );
    }

    // Grafana: provisioning and dashboards are mounted where the provider looks; the home
    // dashboard exists; every panel, query and variable uses the provisioned datasource.
    let provisioning =
        mounted("grafana", "/etc/grafana/provisioning").expect("grafana provisioning mount");
    let datasources = yaml::load(
        provisioning
            .join("datasources/prometheus.yml")
            .strip_prefix(yaml::repo_path(""))
            .unwrap()
            .to_str()
            .unwrap(),
    );
    let ds = &datasources["datasources"][0];
    let uid = ds["uid"].as_str().expect("datasource uid");
    assert_eq!(ds["type"], "prometheus");
    let ds_host = ds["url"]
        .as_str()
        .and_then(|u| u.strip_prefix("http://"))
        .and_then(|u| u.split(':').next())
        .expect("datasource url");
    assert!(
        services.contains_key(ds_host),
        "the datasource points at {ds_host}"
    );
    let providers = yaml::load(
        provisioning
            .join("dashboards/creditd.yml")
            .strip_prefix(yaml::repo_path(""))
            .unwrap()
            .to_str()
            .unwrap(),
    );
    let dash_dir = providers["providers"][0]["options"]["path"]
        .as_str()
        .expect("provider path");
    let dash_host = mounted("grafana", dash_dir).expect("dashboards mount");
    let home = environment(&services["grafana"])
        .get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
        .cloned()
        .expect("home dashboard");
    let home_host = mounted("grafana", &home).expect("home dashboard mounted");
    assert!(home_host.is_file(), "{}", home_host.display());
    let mut dashboards = 0;
    for entry in std::fs::read_dir(&dash_host).expect("dashboards folder") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        dashboards += 1;
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read dashboard"))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut stack: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
        let mut panels = 0;
        while let Some(p) = stack.pop() {
            stack.extend(p["panels"].as_array().into_iter().flatten());
            if p["type"] == "row" {
                continue;
            }
            panels += 1;
            let title = &p["title"];
            assert_eq!(
                p["datasource"]["uid"].as_str(),
                Some(uid),
                "panel {title} does not use datasource {uid}"
            );
            for t in p["targets"].as_array().into_iter().flatten() {
                if !t["datasource"].is_null() {
                    assert_eq!(t["datasource"]["uid"].as_str(), Some(uid), "{title}");
                }
            }
        }
        assert!(panels > 0, "{}: no panels", path.display());
        for var in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if var["type"] == "query" {
                assert_eq!(
                    var["datasource"]["uid"].as_str(),
                    Some(uid),
                    "variable {}",
                    var["name"]
                );
            }
        }
    }
    assert!(dashboards >= 1, "no dashboard in {}", dash_host.display());
}

/// The Dockerfile's instructions: (KEYWORD, arguments), continuation lines joined, comments
/// and parser directives dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        if let Some(part) = trimmed.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((keyword.to_ascii_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

/// The command of a CMD/ENTRYPOINT/HEALTHCHECK CMD, exec (JSON) or shell form, as words.
fn command_words(args: &str) -> Vec<String> {
    match serde_json::from_str::<Vec<String>>(args) {
        Ok(list) => list,
        Err(_) => args.split_whitespace().map(str::to_string).collect(),
    }
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_and_health_checked() {
    let text = std::fs::read_to_string(yaml::repo_path(DOCKERFILE)).expect("Dockerfile");
    let all = instructions(&text);
    let froms: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(froms.len() >= 2, "not multi-stage: {} FROM", froms.len());
    let stage_names: Vec<String> = froms
        .iter()
        .filter_map(|&i| {
            let words: Vec<&str> = all[i].1.split_whitespace().collect();
            let at = words.iter().position(|w| w.eq_ignore_ascii_case("as"))?;
            words.get(at + 1).map(|s| s.to_string())
        })
        .collect();
    let last = &all[*froms.last().unwrap()..];
    let copies_from_build = last.iter().any(|(k, a)| {
        k == "COPY"
            && stage_names
                .iter()
                .any(|n| a.contains(&format!("--from={n}")))
    });
    assert!(
        copies_from_build,
        "the final stage copies nothing from a named build stage ({stage_names:?})"
    );
    assert!(
        !last.iter().any(|(k, a)| k == "RUN" && a.contains("cargo ")),
        "the final stage must not compile"
    );

    // A non-root user, by name or uid, in effect at the end.
    let user = last
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, a)| a.clone())
        .expect("no USER in the final stage: it would run as root");
    let name = user.split(':').next().unwrap_or_default();
    assert!(
        !name.is_empty() && name != "root" && name != "0",
        "USER {user} is root"
    );

    // HEALTHCHECK runs `creditd healthcheck`.
    let health = last
        .iter()
        .find(|(k, _)| k == "HEALTHCHECK")
        .map(|(_, a)| a.clone())
        .expect("no HEALTHCHECK in the final stage");
    let cmd = health
        .split_once("CMD")
        .map(|(_, c)| command_words(c.trim()))
        .expect("HEALTHCHECK without CMD");
    assert!(
        cmd.len() == 2 && cmd[0].ends_with("creditd") && cmd[1] == "healthcheck",
        "HEALTHCHECK runs {cmd:?}, not `creditd healthcheck`"
    );
    // The binary has that subcommand.
    let status = Command::new(env!("CARGO_BIN_EXE_creditd"))
        .args(["healthcheck", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run creditd healthcheck --help");
    assert!(status.success(), "creditd has no healthcheck subcommand");
    let entrypoint = last
        .iter()
        .rev()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, a)| command_words(a))
        .expect("ENTRYPOINT");
    assert!(
        entrypoint.first().is_some_and(|e| e.ends_with("creditd")),
        "ENTRYPOINT {entrypoint:?}"
    );
    // The healthcheck binary is the one copied in.
    assert!(
        last.iter()
            .any(|(k, a)| k == "COPY" && a.split_whitespace().last() == Some(cmd[0].as_str())),
        "{} is not where the binary is copied",
        cmd[0]
    );

    // The build context keeps what `cargo build` needs (the ignore file sits by the Dockerfile).
    let ignore = std::fs::read_to_string(yaml::repo_path("docker/Dockerfile.dockerignore"))
        .expect("docker/Dockerfile.dockerignore");
    let needed = ["Cargo.toml", "Cargo.lock", "src", "benches", "build.rs"];
    for pattern in ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!'))
    {
        let p = pattern.trim_start_matches("**/").trim_end_matches('/');
        assert!(
            !needed.contains(&p),
            "docker/Dockerfile.dockerignore excludes {pattern}, which the build needs"
        );
    }
}
