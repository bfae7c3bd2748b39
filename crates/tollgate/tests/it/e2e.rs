//! `tollgate up` as a process, driven by the real `openai` Python SDK (tests/e2e), then
//! `tollgate report --format json` must show the exact token totals.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::harness::sha;

const KEY: &str = "e2e-consumer-key";
const ADMIN_KEY: &str = "e2e-admin-key";
const SIM_KEY: &str = "e2e-sim-key";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The Python with `openai` installed: `TOLLGATE_TEST_PYTHON` (set by tests/run.sh), else the
/// workspace's `.venv`. A missing SDK fails the test rather than skipping it.
fn python() -> PathBuf {
    let path = std::env::var_os("TOLLGATE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    let ok = Command::new(&path)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import openai: run ./tests/run.sh, which installs it",
        path.display()
    );
    path
}

struct Up {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Up {
    /// Reads stdout until a line starts with `prefix`; returns the rest of that line.
    fn wait_for(&mut self, prefix: &str) -> String {
        for line in self.lines.by_ref() {
            let line = line.expect("stdout line");
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_owned();
            }
        }
        panic!("tollgate exited before printing `{prefix}`");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

impl Up {
    /// `tollgate up` on `config` with `data` as its data directory, read up to the line saying
    /// where it listens; that address.
    fn start(config: &Path, data: &Path) -> (Up, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["up", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "warn")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start tollgate up");
        let stdout = child.stdout.take().expect("stdout");
        let mut up = Up {
            child,
            lines: BufReader::new(stdout).lines(),
        };
        let proxy = up.wait_for("listening on ");
        (up, proxy)
    }
}

/// Runs `tests/e2e/{script}` against `proxy` and `sim` with the SDK; the JSON of its last line
/// (what Tollgate must have recorded). Its output is shown when it fails.
async fn sdk_script(script: &str, proxy: &str, sim: &str) -> Value {
    let (python, script) = (python(), workspace_root().join("tests/e2e").join(script));
    let args = [
        "--proxy",
        proxy,
        "--sim",
        sim,
        "--key",
        KEY,
        "--sim-key",
        SIM_KEY,
    ]
    .map(str::to_owned);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args(args)
            .output()
            .expect("run python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("last line")).expect("last line is JSON")
}

/// Waits until every request so far is recorded and consolidated (`tollgate up`'s flush).
async fn flush(proxy: &str) {
    let flush = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{proxy}/tollgate/admin/flush"))
        .header("api-key", ADMIN_KEY)
        .send()
        .await
        .expect("flush");
    assert_eq!(flush.status(), 200);
}

/// `tollgate report --format json` on the same configuration and data, with `extra` flags.
fn report(config: &Path, data: &Path, extra: &[&str]) -> Value {
    let report = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["report", "--format", "json", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .output()
        .expect("run report");
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    serde_json::from_slice(&report.stdout).expect("report JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_through_tollgate_up_matches_the_simulator_and_report_is_exact() {
    sdk_roundtrip("").await;
}

/// The same with `store.type = "cosmos"`: proxy and parser on the Cosmos test server, the
/// report read from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_through_tollgate_up_on_cosmos_matches_and_report_is_exact() {
    let cosmos =
        tollgate_store::conformance::cosmos_test_config(&format!("e2e-{}", std::process::id()));
    sdk_roundtrip(&tollgate_store::conformance::cosmos_toml(&cosmos)).await;
}

/// The `openai` SDK's checks through `tollgate up` with `store` (TOML, empty for the embedded
/// default), then `tollgate report` on the same configuration.
async fn sdk_roundtrip(store: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "{store}[proxy]\nadmin_key_sha256 = \"{}\"\n[[proxy.consumers]]\nid = \"e2e\"\nkey_sha256 = [\"{}\"]\n[sim]\napi_key = \"{SIM_KEY}\"\n",
            sha(ADMIN_KEY),
            sha(KEY)
        ),
    )
    .expect("write config");
    let (mut up, proxy) = Up::start(&config, &data);
    let sim = up.wait_for("simulator on ");
    let sim = sim.split_whitespace().next().expect("simulator url");
    let expected = sdk_script("sdk_roundtrip.py", &proxy, sim).await;
    flush(&proxy).await;
    let report = report(&config, &data, &[]);
    let totals = &report["totals"];
    for key in ["requests", "inputTokens", "outputTokens", "totalTokens"] {
        assert_eq!(totals[key], expected[key], "report {key}");
    }
    assert_eq!(totals["errors"], 0);
    assert_eq!(
        totals["estimatedRequests"], 0,
        "the stream without include_usage is billed with AOAI's usage, asked for by Tollgate"
    );
    assert!(
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["consumer"] == "e2e")
    );

    // Ctrl-C drains and exits cleanly.
    let pid = up.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let rest = up.wait_for("stopped");
    assert!(rest.is_empty());
    let status = up.child.wait().expect("exit status");
    assert!(status.success(), "tollgate up exited with {status}");
}

/// The `openai` SDK on the `/openai/v1` surface (`OpenAI(base_url=...)`) through a pool of two
/// simulators: answers identical to a simulator's own, calls balanced over both backends, and
/// a file uploaded through the pool found by every later call on its id (files pinned to the
/// stateful backend). The records, read back with `tollgate report --by-backend`, say which
/// backend served what.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_v1_through_a_pool_balances_and_pins_files() {
    let mut sims = Vec::new();
    for _ in 0..2 {
        let sim = tollgate_aoai_sim::Simulator::new(tollgate_aoai_sim::SimConfig {
            api_key: Some(SIM_KEY.into()),
            ..tollgate_aoai_sim::SimConfig::default()
        })
        .expect("sim");
        sims.push(format!(
            "http://{}",
            crate::harness::serve(sim.router()).await
        ));
    }
    let deployments = r#"["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]"#;
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"[proxy]
admin_key_sha256 = "{admin}"
[[proxy.consumers]]
id = "e2e"
key_sha256 = ["{key}"]
[[proxy.backends]]
name = "keeper"
endpoint = "{a}"
api_key = "{SIM_KEY}"
deployments = {deployments}
stateful = true
[[proxy.backends]]
name = "other"
endpoint = "{b}"
api_key = "{SIM_KEY}"
deployments = {deployments}
"#,
            admin = sha(ADMIN_KEY),
            key = sha(KEY),
            a = sims[0],
            b = sims[1],
        ),
    )
    .expect("write config");
    let (_up, proxy) = Up::start(&config, &data);
    let expected = sdk_script("sdk_pool.py", &proxy, &sims[0]).await;
    flush(&proxy).await;
    let report = report(&config, &data, &["--by-backend"]);
    let rows = report["rows"].as_array().expect("rows");
    let count = |keep: &dyn Fn(&Value) -> bool| -> u64 {
        rows.iter()
            .filter(|r| keep(r))
            .map(|r| r["requests"].as_u64().unwrap_or(0))
            .sum()
    };
    // Files calls name no deployment: every one on the stateful backend.
    let files = count(&|r| r["deployment"] == "");
    assert_eq!(files, expected["pinned"].as_u64().unwrap());
    assert_eq!(
        count(&|r| r["deployment"] == "" && r["backend"] == "keeper"),
        files
    );
    // The rest spread over both (48 calls at 1:1; one backend taking all is 2^-47).
    let model_calls = count(&|r| r["deployment"] != "");
    assert_eq!(model_calls, expected["balanced"].as_u64().unwrap());
    for backend in ["keeper", "other"] {
        assert!(
            count(&|r| r["deployment"] != "" && r["backend"] == backend) > 0,
            "{backend} served none: {rows:#?}"
        );
    }
    assert_eq!(report["totals"]["errors"], 0);
}

#[test]
fn check_lists_every_problem_and_env_overrides_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\ntype = \"embedded\"\ndata_dir = \"{}\"\n[[proxy.backends]]\nname = \"b\"\nendpoint = \"ftp://nowhere\"\ndeployments = [\"d\"]\n[[proxy.consumers]]\nid = \"c\"\nkey_sha256 = [\"not-hex\"]\n",
            dir.path().join("data").display()
        ),
    )
    .expect("write config");
    let bin = env!("CARGO_BIN_EXE_tollgate");
    let out = Command::new(bin)
        .args(["check", "--config"])
        .arg(&config)
        .env("TOLLGATE__PROXY__LIMITS__IDLE_TIMEOUT_MS", "0")
        .output()
        .expect("run check");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for problem in [
        "endpoint `ftp://nowhere`",
        "key_sha256 `not-hex`",
        "idle_timeout_ms",
    ] {
        assert!(err.contains(problem), "`{problem}` missing from:\n{err}");
    }

    std::fs::write(
        &config,
        format!(
            "[store]\ntype = \"embedded\"\ndata_dir = \"{}\"\n[[proxy.consumers]]\nid = \"c\"\nkey_sha256 = [\"{}\"]\n",
            dir.path().join("data").display(),
            sha("k")
        ),
    )
    .expect("write config");
    // A store `tollgate up` would have created: `check` only reads one.
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(tollgate_store::embedded::EmbeddedStore::open(
            &dir.path().join("data"),
            1000,
        ))
        .expect("store created");
    let ok = Command::new(bin)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("check");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("configuration ok"));

    let typo = Command::new(bin)
        .args(["check", "--config"])
        .arg(&config)
        .env("TOLLGATE__PROXY__LIMITS__IDLE_TIMEOUT", "5")
        .output()
        .expect("check");
    assert!(
        !typo.status.success(),
        "unknown keys from the environment are errors too"
    );
}
