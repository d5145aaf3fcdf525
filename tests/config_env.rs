//! `${VAR}` references in the config, as an operator meets them: the built
//! binary's `check-config` with the variable in its environment and without.

use std::process::Command;

fn check_config(path: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hj212-gateway"));
    c.arg("check-config").arg(path);
    for var in ["HJ212_TEST_MQTT_PW", "HJ212_TEST_LISTEN"] {
        c.env_remove(var);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run hj212-gateway check-config")
}

#[test]
fn check_config_expands_the_environment_and_names_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "# password = \"${NOT_NEEDED_IN_A_COMMENT}\"\n\
         [server]\n\
         listen = [\"${HJ212_TEST_LISTEN:-127.0.0.1:9212}\"]\n\
         [mqtt]\n\
         enabled = true\n\
         url = \"mqtt://127.0.0.1:1883\"\n\
         username = \"gateway\"\n\
         password = \"${HJ212_TEST_MQTT_PW}\"\n",
    )
    .expect("write config");

    let o = check_config(&path, &[("HJ212_TEST_MQTT_PW", "pa$$word with spaces")]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains(": ok (1 listen address(es)"), "{stdout}");

    // Unset: a config error (78) naming the variable and its line, nothing else.
    let o = check_config(&path, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(78), "{stderr}");
    let want = format!(
        "{}:8: environment variable `HJ212_TEST_MQTT_PW` is not set",
        path.display()
    );
    assert!(stderr.contains(&want), "{stderr}");

    // A value that is no valid TOML there: the message quotes the line as
    // written, never the value.
    let o = check_config(
        &path,
        &[
            ("HJ212_TEST_MQTT_PW", "secret-value"),
            ("HJ212_TEST_LISTEN", "a\" = \"b"),
        ],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("listen = [\"${HJ212_TEST_LISTEN:-127.0.0.1:9212}\"]"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret-value"), "{stderr}");
}
