//! The parent's environment does not reach a native function. Its own test binary:
//! it sets a variable in the process environment, which must not race other tests.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use common::*;
use ferry_runtime::Outcome;

#[tokio::test]
async fn a_secret_in_the_parent_environment_does_not_leak() {
    #[allow(unsafe_code)]
    // SAFETY: the only test in this binary, run before it starts any thread of its
    // own that could read the environment concurrently.
    unsafe {
        std::env::set_var("SECRET_TOKEN", "hunter2");
    }
    assert_eq!(std::env::var("SECRET_TOKEN").as_deref(), Ok("hunter2"));
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let (sha, bytes) = native_package("#!/bin/sh\nenv\n");
    rt.prepare(&sha, &bytes).unwrap();
    let mut req = request(b"", limits(64, 5000));
    // The request's extra variables are set; they cannot replace the runtime's own.
    req.env = vec![
        ("FERRY_API_URL".into(), "http://127.0.0.1:7070".into()),
        ("PATH".into(), "/evil".into()),
        ("FERRY_FUNCTION".into(), "other".into()),
    ];
    let inv = rt.invoke(&sha, req).await.unwrap();
    let Outcome::Succeeded(out) = &inv.outcome else {
        panic!("{:?}", inv.outcome)
    };
    let env = String::from_utf8_lossy(out);
    assert!(env.contains("FERRY_FUNCTION=test-fn"), "{env}");
    assert!(
        env.contains("FERRY_API_URL=http://127.0.0.1:7070\n"),
        "{env}"
    );
    assert!(!env.contains("/evil") && !env.contains("=other"), "{env}");
    assert!(
        !env.contains("SECRET_TOKEN") && !env.contains("hunter2"),
        "{env}"
    );
}
