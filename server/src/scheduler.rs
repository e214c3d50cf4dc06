//! One scheduler for the server's periodic work (CA rotation, join-token pruning, Engine key
//! ticks, server SVID renewal).
//!
//! Each job has a period (fixed, or asked of the job again after every run) and a jitter, so
//! servers started together do not act in lockstep. Due times come from the injected
//! [`Clock`]: a test moves a `ManualClock` and calls [`Scheduler::run_due`]. A job that fails is
//! logged with its own message and runs again one period later; it never stops the others. A
//! job runs in its own task, so even a panic is only logged.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use continuity_common::Clock;
use futures_util::future::BoxFuture;

/// What a job's run returns: its failure is logged, then the job waits for its next period.
pub type JobResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The default jitter: each wait is the period ±10%.
pub const DEFAULT_JITTER: f64 = 0.1;

/// Longest the scheduler sleeps before looking at the clock again (a clock that jumps, or a
/// dynamic period that got shorter, is noticed within this).
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// How loudly a failed run is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureLevel {
    /// `tracing::error!`.
    Error,
    /// `tracing::warn!`.
    Warn,
}

type RunFn = Arc<dyn Fn() -> BoxFuture<'static, JobResult> + Send + Sync>;
type PeriodFn = Box<dyn Fn() -> Duration + Send + Sync>;

/// One periodic job.
pub struct Job {
    name: &'static str,
    period: PeriodFn,
    jitter: f64,
    failure: (FailureLevel, &'static str),
    run: RunFn,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("name", &self.name)
            .field("jitter", &self.jitter)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// A job named `name` that runs `run` every `period` (±[`DEFAULT_JITTER`]); a failure is
    /// logged at error level with the message `on_failure`.
    pub fn every<F, Fut>(
        name: &'static str,
        period: Duration,
        on_failure: &'static str,
        run: F,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = JobResult> + Send + 'static,
    {
        Self::dynamic(name, move || period, on_failure, run)
    }

    /// Like [`Job::every`], but the period is asked of `period` again after every run (e.g. half
    /// the remaining life of a certificate).
    pub fn dynamic<P, F, Fut>(
        name: &'static str,
        period: P,
        on_failure: &'static str,
        run: F,
    ) -> Self
    where
        P: Fn() -> Duration + Send + Sync + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = JobResult> + Send + 'static,
    {
        Self {
            name,
            period: Box::new(period),
            jitter: DEFAULT_JITTER,
            failure: (FailureLevel::Error, on_failure),
            run: Arc::new(move || Box::pin(run())),
        }
    }

    /// Sets the jitter: each wait is the period times a factor in [1 - `jitter`, 1 + `jitter`]
    /// (clamped to [0, 1]).
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Logs failures at `level` instead of error.
    pub fn failures_at(mut self, level: FailureLevel) -> Self {
        self.failure.0 = level;
        self
    }

    /// The name given at construction.
    pub fn name(&self) -> &'static str {
        self.name
    }

    fn log_failure(&self, error: &dyn std::fmt::Display) {
        match self.failure {
            (FailureLevel::Error, msg) => tracing::error!(error = %error, "{msg}"),
            (FailureLevel::Warn, msg) => tracing::warn!(error = %error, "{msg}"),
        }
    }
}

/// `period` scaled by a factor in [1 - `jitter`, 1 + `jitter`), `fraction` (in [0, 1)) choosing
/// where; never shorter than a millisecond, so no job can spin.
pub fn jittered(period: Duration, jitter: f64, fraction: f64) -> Duration {
    let factor = 1.0 + jitter * (2.0 * fraction.clamp(0.0, 1.0) - 1.0);
    period
        .mul_f64(factor.max(0.0))
        .max(Duration::from_millis(1))
}

/// A job and when it is next due.
struct Scheduled {
    job: Job,
    due: SystemTime,
}

/// The set of periodic jobs and the clock that says when they are due.
pub struct Scheduler {
    clock: Arc<dyn Clock>,
    jobs: Vec<Scheduled>,
    poll: Duration,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field(
                "jobs",
                &self.jobs.iter().map(|s| s.job.name).collect::<Vec<_>>(),
            )
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// An empty scheduler on `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            jobs: Vec::new(),
            poll: DEFAULT_POLL,
        }
    }

    /// Sets how long the running loop sleeps at most between looks at the clock.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll.max(Duration::from_millis(1));
        self
    }

    /// Adds a job; its first run is one (jittered) period from now.
    pub fn add(&mut self, job: Job) {
        let due = self.next_due(&job);
        self.jobs.push(Scheduled { job, due });
    }

    /// When the job named `name` is next due.
    pub fn due(&self, name: &str) -> Option<SystemTime> {
        self.jobs.iter().find(|s| s.job.name == name).map(|s| s.due)
    }

    fn next_due(&self, job: &Job) -> SystemTime {
        let wait = jittered(
            (job.period)(),
            job.jitter,
            continuity_common::rand::jitter_fraction(),
        );
        self.clock.now() + wait
    }

    /// Runs, one after another, every job due by the clock's now, and schedules each one period
    /// after it finished (a failed run included). Returns how many ran. A due time further
    /// away than one full period (the clock was set back) is brought back to one period from
    /// now, so a backwards clock step never postpones a job by the size of the step.
    pub async fn run_due(&mut self) -> usize {
        let now = self.clock.now();
        let mut ran = 0;
        for i in 0..self.jobs.len() {
            let job = &self.jobs[i].job;
            let longest = jittered((job.period)(), job.jitter, 1.0);
            if self.jobs[i].due > now + longest {
                self.jobs[i].due = self.next_due(job);
            }
            if self.jobs[i].due > now {
                continue;
            }
            let job = &self.jobs[i].job;
            match tokio::spawn((job.run)()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => job.log_failure(&e),
                Err(e) => job.log_failure(&format_args!("job {} panicked: {e}", job.name)),
            }
            ran += 1;
            self.jobs[i].due = self.next_due(&self.jobs[i].job);
        }
        ran
    }

    /// How long until the earliest job is due, at most the poll interval.
    fn sleep_for(&self) -> Duration {
        let now = self.clock.now();
        self.jobs
            .iter()
            .map(|s| s.due.duration_since(now).unwrap_or(Duration::ZERO))
            .min()
            .unwrap_or(self.poll)
            .min(self.poll)
    }

    /// Runs the jobs, each in a loop of its own (a job that hangs holds up no other), for as
    /// long as the returned tasks live.
    pub fn spawn(self) -> Vec<tokio::task::JoinHandle<()>> {
        let (clock, poll) = (self.clock, self.poll);
        self.jobs
            .into_iter()
            .map(|one| {
                let mut alone = Scheduler {
                    clock: clock.clone(),
                    jobs: vec![one],
                    poll,
                };
                tokio::spawn(async move {
                    loop {
                        alone.run_due().await;
                        tokio::time::sleep(alone.sleep_for()).await;
                    }
                })
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
