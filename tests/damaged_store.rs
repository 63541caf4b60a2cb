//! A damaged, truncated or emptied data file: `creditd serve` refuses it with one clear line naming the
//! file and the next step, and exit code 65, never a panic trace nor a new empty store; and
//! `creditd check` finds the damage offline (and passes a sound file).

mod common;

use std::path::Path;
use std::time::Duration;

use common::run_binary;
use creditd::model::{Amount, Mode, OrgId, WorkspaceId};
use creditd::store::embedded::{EmbeddedOptions, EmbeddedStore, DB_FILE};
use creditd::store::{ControlOp, Store};

const EXIT_DAMAGED: i32 = 65;
const LIMIT: Duration = Duration::from_secs(30);

/// A store with some orgs, workspaces, purchases and transfers, closed.
async fn build_store(dir: &Path) {
    let store = EmbeddedStore::open(
        dir,
        EmbeddedOptions {
            idempotency_keys_max: 1000,
            idempotency_ttl: Duration::from_secs(3600),
            ledger_retain: creditd::config::DEFAULT_LEDGER_RETAIN,
            ..EmbeddedOptions::default()
        },
    )
    .unwrap();
    let primary = WorkspaceId::parse("primary", "w").unwrap();
    for o in 0..40 {
        let org = OrgId::parse(&format!("org-{o}"), "org").unwrap();
        store
            .create_org(&org, Mode::Budget, &primary)
            .await
            .unwrap();
        store
            .apply(
                &org,
                &ControlOp::Purchase {
                    amount: Amount::new(10_000).unwrap(),
                },
                None,
            )
            .await
            .unwrap();
        for w in 0..4 {
            let ws = WorkspaceId::parse(&format!("ws-{w}"), "w").unwrap();
            store
                .apply(
                    &org,
                    &ControlOp::CreateWorkspace {
                        workspace: ws.clone(),
                    },
                    None,
                )
                .await
                .unwrap();
            let op = ControlOp::Transfer {
                from: primary.clone(),
                to: ws,
                amount: Amount::new(100).unwrap(),
            };
            store.apply(&org, &op, None).await.unwrap();
        }
    }
}

/// Overwrites 8 KiB at `offset` with a fixed pattern.
fn damage(file: &Path, offset: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 37 + 11) as u8).collect();
    f.write_all(&garbage).unwrap();
    f.sync_all().unwrap();
}

/// The one line of `stderr` that carries the refusal, checked for what it must say.
fn assert_clear_refusal(stderr: &str, file: &Path, what: &str) {
    assert!(
        !stderr.contains("panicked at") && !stderr.contains("RUST_BACKTRACE"),
        "{what}: a panic reached stderr:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("damaged")).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: one line names the damage:\n{stderr}"
    );
    let line = lines[0];
    assert!(
        line.contains(&file.display().to_string()),
        "{what}: the line names the file {}: {line}",
        file.display()
    );
    assert!(
        line.contains("restore a backup") && line.contains("creditd check"),
        "{what}: the line says what to do: {line}"
    );
}

fn serve(dir: &Path) -> (std::process::ExitStatus, String) {
    let dir_s = dir.display().to_string();
    run_binary(
        &["serve"],
        &[
            ("CREDITD_DATA_DIR", dir_s.as_str()),
            ("CREDITD_LISTEN", "127.0.0.1:0"),
        ],
        dir.parent().unwrap(),
        LIMIT,
    )
}

fn check(dir: &Path) -> (std::process::ExitStatus, String, String) {
    let mut cmd = std::process::Command::new(common::binary());
    cmd.args(["check", "--data-dir"])
        .arg(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    let done = common::run_bounded(cmd, None, LIMIT, "creditd check");
    (done.status, done.stdout, done.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_file_is_refused_with_one_clear_line_and_exit_65() {
    let root = tempfile::tempdir().unwrap();
    let sound = root.path().join("sound");
    build_store(&sound).await;
    let original = sound.join(DB_FILE);
    let size = std::fs::metadata(&original).unwrap().len();

    let (status, stdout, stderr) = check(&sound);
    assert_eq!(status.code(), Some(0), "check of a sound file: {stderr}");
    assert!(
        stdout.starts_with("ok: ") && stdout.contains("40 orgs"),
        "{stdout}"
    );

    // The header, the first region's metadata, and pages of the tables.
    for offset in [0u64, 4096, 262_144] {
        assert!(offset + 8192 <= size, "the file is {size} bytes");
        let dir = root.path().join(format!("damaged-{offset}"));
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join(DB_FILE);
        std::fs::copy(&original, &file).unwrap();
        damage(&file, offset);
        let before = std::fs::read(&file).unwrap();

        let (status, stderr) = serve(&dir);
        assert_eq!(
            status.code(),
            Some(EXIT_DAMAGED),
            "serve, damage at {offset}: {status:?}\n{stderr}"
        );
        assert_clear_refusal(&stderr, &file, &format!("serve, damage at {offset}"));

        let (status, _, stderr) = check(&dir);
        assert_eq!(
            status.code(),
            Some(EXIT_DAMAGED),
            "check, damage at {offset}: {stderr}"
        );
        assert_clear_refusal(&stderr, &file, &format!("check, damage at {offset}"));
        assert!(
            std::fs::read(&file).unwrap() == before,
            "damage at {offset}: the damaged file was changed"
        );
    }

    // A file cut short.
    let dir = root.path().join("truncated");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join(DB_FILE);
    std::fs::copy(&original, &file).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let (status, stderr) = serve(&dir);
    assert_eq!(status.code(), Some(EXIT_DAMAGED), "{stderr}");
    assert_clear_refusal(&stderr, &file, "serve, truncated file");

    // An emptied file is damage too, not a new empty store.
    let dir = root.path().join("emptied");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join(DB_FILE);
    std::fs::File::create(&file).unwrap();
    let (status, stderr) = serve(&dir);
    assert_eq!(status.code(), Some(EXIT_DAMAGED), "{stderr}");
    assert_clear_refusal(&stderr, &file, "serve, emptied file");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
}
