//! `mamba2 serve` on the bundled model: it prints where it listens, answers `/v1/models` with
//! the bundled model's id and a completion over plain HTTP, and refuses a bad `--max-batch`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

/// One HTTP/1.1 request with `Connection: close`; returns the whole response text.
fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serve_answers_openai_requests() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mamba2"))
        .args([
            "serve",
            "--port",
            "0",
            "--device",
            "cpu",
            "--max-batch",
            "4",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mamba2 serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("serve exited before listening")
            .unwrap();
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let models = http(&addr, "GET", "/v1/models", "");
    let completion = http(
        &addr,
        "POST",
        "/v1/completions",
        r#"{"model": "mamba2-tiny", "prompt": "The old man said", "max_tokens": 3, "temperature": 0}"#,
    );
    let unknown = http(
        &addr,
        "POST",
        "/v1/completions",
        r#"{"model": "other", "prompt": "x"}"#,
    );
    child.kill().unwrap();
    let _ = child.wait();
    assert!(models.starts_with("HTTP/1.1 200"), "{models}");
    assert!(models.contains(r#""id":"mamba2-tiny""#), "{models}");
    assert!(completion.starts_with("HTTP/1.1 200"), "{completion}");
    assert!(
        completion.contains(r#""completion_tokens":3"#),
        "{completion}"
    );
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
}

#[test]
fn serve_refuses_a_zero_batch() {
    let out = Command::new(env!("CARGO_BIN_EXE_mamba2"))
        .args(["serve", "--max-batch", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-batch"));
}
