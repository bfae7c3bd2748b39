//! `tollgate up` reloading its configuration file without a restart: on
//! `POST /tollgate/admin/reload` and on SIGHUP, the backends the file names now serve, and a
//! file that changes a section needing a restart is refused with the running configuration
//! kept. Waits are bounded and poll the admin API for the state they wait for.

use std::time::Duration;

use serde_json::{Value, json};
use tollgate_aoai_sim::{SimConfig, Simulator};

use crate::harness::{SIM_KEY, serve};
use crate::up::{Up, UpConfig};

const KEY: &str = "reload-consumer-key";
const ADMIN_KEY: &str = "reload-admin-key";
const PATIENCE: Duration = Duration::from_secs(30);

async fn sim() -> String {
    let sim = Simulator::new(SimConfig {
        api_key: Some(SIM_KEY.into()),
        ..SimConfig::default()
    })
    .expect("sim");
    format!("http://{}", serve(sim.router()).await)
}

/// The `[[proxy.backends]]` section naming `name` at `endpoint` for `gpt-4o`.
fn backend(name: &str, endpoint: &str) -> String {
    format!(
        "[[proxy.backends]]\nname = \"{name}\"\nendpoint = \"{endpoint}\"\napi_key = \"{SIM_KEY}\"\ndeployments = [\"gpt-4o\"]\n"
    )
}

struct Rig {
    up: Up,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Rig {
    /// Rewrites the configuration file `Up` wrote, with `sections` in place of the first run's.
    fn rewrite(&self, sections: &str) {
        let path = self.dir.path().join("tollgate.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        let head = text
            .split("[[proxy.backends]]")
            .next()
            .expect("the consumer part")
            .to_owned();
        std::fs::write(&path, format!("{head}{sections}[log]\nfilter = \"warn\"\n"))
            .expect("rewrite config");
    }

    async fn backends(&self) -> Vec<String> {
        let url = format!("{}/tollgate/admin/backends", self.up.base());
        let b = crate::harness::get_json(&self.http, &url, ADMIN_KEY).await;
        b["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| b["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    async fn reload(&self) -> reqwest::Response {
        self.http
            .post(format!("{}/tollgate/admin/reload", self.up.base()))
            .header("api-key", ADMIN_KEY)
            .send()
            .await
            .unwrap()
    }

    async fn chat(&self) -> u16 {
        let resp = self
            .http
            .post(format!(
                "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                self.up.base()
            ))
            .header("api-key", KEY)
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        resp.text().await.unwrap();
        status
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_is_applied_again_on_the_admin_call_and_on_sighup() {
    let (first, second) = (sim().await, sim().await);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = Up::start(
        dir.path(),
        &data,
        "tollgate-reload",
        &UpConfig {
            env: &[],
            consumer: "reload",
            key: KEY,
            admin_key: ADMIN_KEY,
            sections: &backend("first", &first),
        },
    );
    let rig = Rig {
        up,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        dir,
    };
    assert_eq!(rig.backends().await, ["first"]);
    assert_eq!(rig.chat().await, 200);

    // The admin call: applied at once, and says what changed.
    rig.rewrite(&backend("second", &second));
    let resp = rig.reload().await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reloaded"]["backendsAdded"], json!(["second"]));
    assert_eq!(body["reloaded"]["backendsRemoved"], json!(["first"]));
    assert_eq!(rig.backends().await, ["second"]);
    assert_eq!(rig.chat().await, 200);

    // A change to a section that sizes the running proxy: refused, nothing changes.
    rig.rewrite(&format!(
        "{}[proxy.limits]\nmax_attempts = 9\n",
        backend("first", &first)
    ));
    let resp = rig.reload().await;
    assert_eq!(resp.status(), 409);
    assert_eq!(rig.backends().await, ["second"]);

    // SIGHUP: the file is read again in the background; the admin API shows when.
    rig.rewrite(&format!(
        "{}{}",
        backend("first", &first),
        backend("second", &second)
    ));
    let pid = rig.up.child.lock().expect("child").id().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while rig.backends().await != ["first", "second"] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP not applied: {:?}",
            rig.backends().await
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(rig.chat().await, 200);
    assert!(
        rig.up
            .child
            .lock()
            .expect("child")
            .try_wait()
            .unwrap()
            .is_none(),
        "SIGHUP reloads, it does not stop the process"
    );
}
