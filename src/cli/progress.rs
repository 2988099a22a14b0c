//! Progress on stderr for long commands (`learn`, `login`, `demo`): on a terminal, each step
//! as a line and, under it, a spinner with the current step and the time elapsed; otherwise
//! plain lines only.
//!
//! Invariant: writing progress never fails a command. A closed pipe or terminal loses the
//! lines, not the work (a learn still stores its flow).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

const FRAMES: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];
/// How often the spinner redraws.
const TICK: Duration = Duration::from_millis(100);
/// Clears the terminal line the cursor is on.
const CLEAR: &str = "\r\x1b[2K";

type Sink = Box<dyn Write + Send>;

struct Inner {
    out: Sink,
    terminal: bool,
    started: Instant,
    current: String,
    tick: usize,
    spinning: bool,
}

impl Inner {
    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn clear(&mut self) {
        if self.terminal && self.spinning {
            let _ = write!(self.out, "{CLEAR}");
            self.spinning = false;
        }
    }

    fn draw(&mut self) {
        if !self.terminal || self.current.is_empty() {
            return;
        }
        let frame = FRAMES[self.tick % FRAMES.len()];
        let _ = write!(
            self.out,
            "{CLEAR}{frame} {}  {:.1} s",
            self.current,
            self.elapsed()
        );
        let _ = self.out.flush();
        self.spinning = true;
    }
}

/// Progress of one command. Cheap to clone; the spinner stops when [`Progress::finish`] is
/// called or the last clone is dropped.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Mutex<Inner>>,
}

impl Progress {
    /// Progress on stderr, with a spinner when stderr is a terminal.
    pub fn stderr() -> Self {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Self::new(Box::new(std::io::stderr()), terminal)
    }

    pub fn new(out: Sink, terminal: bool) -> Self {
        let progress = Self {
            inner: Arc::new(Mutex::new(Inner {
                out,
                terminal,
                started: Instant::now(),
                current: String::new(),
                tick: 0,
                spinning: false,
            })),
        };
        if terminal {
            let weak = Arc::downgrade(&progress.inner);
            // Ends by itself once the progress is gone (or finished).
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(TICK);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    ticks.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
                    if inner.current.is_empty() && inner.tick > 0 {
                        return;
                    }
                    inner.tick += 1;
                    inner.draw();
                }
            });
        }
        progress
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new step: printed as a line, and shown by the spinner until the next one.
    pub fn step(&self, text: &str) {
        let mut inner = self.lock();
        inner.clear();
        let elapsed = inner.elapsed();
        let _ = writeln!(inner.out, "==> {elapsed:>5.1} s  {text}");
        inner.current = text.to_owned();
        inner.draw();
    }

    /// A line that is not a step (a detail, a URL to open): printed, the spinner kept.
    pub fn note(&self, text: &str) {
        let mut inner = self.lock();
        inner.clear();
        let _ = writeln!(inner.out, "    {text}");
        inner.draw();
    }

    /// Stops the spinner and clears its line.
    pub fn finish(&self) {
        let mut inner = self.lock();
        inner.clear();
        inner.current.clear();
        inner.tick = inner.tick.max(1);
        let _ = inner.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// A writer whose reader went away, as a closed pipe.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_terminal_steps_are_plain_lines() {
        let buffer = Buffer::default();
        let progress = Progress::new(Box::new(buffer.clone()), false);
        progress.step("probing");
        tokio::time::advance(Duration::from_millis(1500)).await;
        progress.step("inferring");
        progress.note("a detail");
        progress.finish();
        assert_eq!(
            buffer.text(),
            "==>   0.0 s  probing\n==>   1.5 s  inferring\n    a detail\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn on_a_terminal_a_spinner_shows_the_step_and_the_time() {
        let buffer = Buffer::default();
        let progress = Progress::new(Box::new(buffer.clone()), true);
        progress.step("probing");
        for _ in 0..12 {
            tokio::time::advance(TICK).await;
            tokio::task::yield_now().await;
        }
        let text = buffer.text();
        assert!(text.starts_with("==>   0.0 s  probing\n"), "{text:?}");
        assert!(
            text.contains(&format!("{CLEAR}⠙ probing  0.1 s")),
            "{text:?}"
        );
        assert!(text.contains("probing  1.2 s"), "{text:?}");
        progress.finish();
        assert!(
            buffer.text().ends_with(CLEAR),
            "the spinner's line is cleared"
        );
        let after = buffer.text().len();
        for _ in 0..5 {
            tokio::time::advance(TICK).await;
            tokio::task::yield_now().await;
        }
        assert_eq!(buffer.text().len(), after, "no drawing after finish");
    }

    #[tokio::test]
    async fn a_closed_output_loses_lines_not_the_command() {
        let progress = Progress::new(Box::new(Closed), true);
        progress.step("probing");
        progress.note("still fine");
        progress.finish();
    }
}
