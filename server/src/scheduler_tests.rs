//! Scheduler tests on a `ManualClock`: nothing sleeps, time moves only when the test says so.

use std::sync::atomic::{AtomicUsize, Ordering};

use continuity_common::ManualClock;

use super::*;

const START: Duration = Duration::from_secs(1_700_000_000);

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH + START))
}

/// A job that counts its runs and fails when `fail` says so.
fn counting(
    name: &'static str,
    period: Duration,
    fail: impl Fn(usize) -> bool + Send + Sync + 'static,
) -> (Job, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let fail = Arc::new(fail);
    let job = Job::every(name, period, "test job failed", move || {
        let n = r.fetch_add(1, Ordering::SeqCst);
        let fail = fail.clone();
        async move { if fail(n) { Err("boom".into()) } else { Ok(()) } }
    });
    (job, runs)
}

#[tokio::test]
async fn advancing_the_clock_runs_the_due_jobs_and_only_those() {
    let clock = clock();
    let mut s = Scheduler::new(clock.clone());
    let (fast, fast_runs) = counting("fast", Duration::from_secs(10), |_| false);
    let (slow, slow_runs) = counting("slow", Duration::from_secs(100), |_| false);
    s.add(fast.with_jitter(0.0));
    s.add(slow.with_jitter(0.0));
    assert_eq!(
        s.run_due().await,
        0,
        "nothing is due before a period has passed"
    );
    clock.advance(Duration::from_secs(9));
    assert_eq!(s.run_due().await, 0);
    clock.advance(Duration::from_secs(1));
    assert_eq!(s.run_due().await, 1);
    assert_eq!(fast_runs.load(Ordering::SeqCst), 1);
    assert_eq!(slow_runs.load(Ordering::SeqCst), 0);
    assert_eq!(
        s.run_due().await,
        0,
        "a job that ran is not due again at once"
    );
    for _ in 0..9 {
        clock.advance(Duration::from_secs(10));
        s.run_due().await;
    }
    assert_eq!(fast_runs.load(Ordering::SeqCst), 10);
    assert_eq!(slow_runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn jitter_stays_within_its_bounds() {
    let clock = clock();
    let mut s = Scheduler::new(clock.clone());
    let period = Duration::from_secs(100);
    let (job, _) = counting("j", period, |_| false);
    s.add(job);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let wait = s.due("j").unwrap().duration_since(clock.now()).unwrap();
        assert!(
            wait >= period.mul_f64(0.9) && wait <= period.mul_f64(1.1),
            "{wait:?} is not within 10% of {period:?}"
        );
        seen.insert(wait);
        clock.advance(wait);
        assert_eq!(s.run_due().await, 1);
    }
    assert!(seen.len() > 1, "the waits are spread, not all equal");
    for f in [0.0, 0.5, 0.999_999, 1.0, -3.0, 7.0] {
        let d = jittered(period, 0.1, f);
        assert!(
            d >= period.mul_f64(0.9) && d <= period.mul_f64(1.1),
            "{f}: {d:?}"
        );
    }
    assert_eq!(jittered(period, 0.0, 0.3), period);
    assert_eq!(jittered(Duration::ZERO, 0.1, 0.0), Duration::from_millis(1));
}

#[tokio::test]
async fn a_failing_job_is_retried_next_period_and_does_not_stop_the_others() {
    let clock = clock();
    let mut s = Scheduler::new(clock.clone());
    let (bad, bad_runs) = counting("bad", Duration::from_secs(10), |n| n < 2);
    let (good, good_runs) = counting("good", Duration::from_secs(10), |_| false);
    let panicky = Job::every("panicky", Duration::from_secs(10), "panicked", || async {
        panic!("job panic");
    });
    s.add(bad.with_jitter(0.0));
    s.add(panicky.with_jitter(0.0).failures_at(FailureLevel::Warn));
    s.add(good.with_jitter(0.0));
    for round in 1..=3 {
        clock.advance(Duration::from_secs(5));
        assert_eq!(
            s.run_due().await,
            0,
            "a failure is not retried before its period"
        );
        clock.advance(Duration::from_secs(5));
        assert_eq!(s.run_due().await, 3, "round {round}");
        assert_eq!(bad_runs.load(Ordering::SeqCst), round);
        assert_eq!(good_runs.load(Ordering::SeqCst), round);
    }
}

#[tokio::test]
async fn a_dynamic_period_is_asked_again_after_every_run() {
    let clock = clock();
    let mut s = Scheduler::new(clock.clone());
    let period = Arc::new(AtomicUsize::new(10));
    let p = period.clone();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let job = Job::dynamic(
        "dyn",
        move || Duration::from_secs(p.load(Ordering::SeqCst) as u64),
        "dyn failed",
        move || {
            r.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        },
    );
    s.add(job.with_jitter(0.0));
    period.store(1000, Ordering::SeqCst);
    clock.advance(Duration::from_secs(10));
    assert_eq!(s.run_due().await, 1);
    clock.advance(Duration::from_secs(999));
    assert_eq!(s.run_due().await, 0);
    clock.advance(Duration::from_secs(1));
    assert_eq!(s.run_due().await, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_spawned_loop_follows_the_injected_clock() {
    let clock = clock();
    let mut s = Scheduler::new(clock.clone()).with_poll(Duration::from_millis(10));
    let (job, runs) = counting("loop", Duration::from_secs(3600), |_| false);
    s.add(job.with_jitter(0.0));
    let task = s.spawn();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "an hour has not passed on the clock"
    );
    clock.advance(Duration::from_secs(3600));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while runs.load(Ordering::SeqCst) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    for t in task {
        t.abort();
    }
}

#[tokio::test]
async fn a_clock_set_back_does_not_postpone_a_job_by_the_step() {
    let clock = clock();
    let mut s = Scheduler::new(clock.clone());
    let (job, runs) = counting("rotate", Duration::from_secs(60), |_| false);
    s.add(job.with_jitter(0.0));
    // The wall clock is corrected a day backwards: the job is still due within one period.
    clock.rewind(Duration::from_secs(86_400));
    assert_eq!(s.run_due().await, 0);
    clock.advance(Duration::from_secs(60));
    assert_eq!(s.run_due().await, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_job_that_hangs_holds_up_no_other_job() {
    let clock = clock();
    let mut s = Scheduler::new(clock.clone()).with_poll(Duration::from_millis(10));
    s.add(
        Job::every("hangs", Duration::from_secs(10), "hung", || {
            std::future::pending::<JobResult>()
        })
        .with_jitter(0.0),
    );
    let (job, runs) = counting("renew", Duration::from_secs(10), |_| false);
    s.add(job.with_jitter(0.0));
    let tasks = s.spawn();
    for _ in 0..3 {
        clock.advance(Duration::from_secs(10));
        let before = runs.load(Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) == before && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "the other job kept its schedule"
    );
    for t in tasks {
        t.abort();
    }
}
