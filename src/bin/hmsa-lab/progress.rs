//! The progress display the binary installs as a training observer: an
//! indicatif bar on a terminal; elsewhere (nohup, Slurm logs, CI) plain
//! lines, `[run i/N] variant seed s step k/S loss … lr … ETA …` every
//! `HMSA_PROGRESS_SECS` seconds (30 by default) and a line per final
//! evaluation; nothing with `HMSA_NO_PROGRESS`.

use hmsa_lab::train::{Observer, StepMetrics};
use hmsa_lab::Result;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    how: How,
}

enum How {
    Off,
    Bar(Option<indicatif::ProgressBar>),
    Lines {
        every: Duration,
        last: Option<Instant>,
        started: Instant,
        first_step: Option<usize>,
    },
}

impl Progress {
    pub fn new(label: &str) -> Self {
        let how = if std::env::var_os("HMSA_NO_PROGRESS").is_some() {
            How::Off
        } else if std::io::stderr().is_terminal() {
            How::Bar(None)
        } else {
            let every = std::env::var("HMSA_PROGRESS_SECS")
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(30.0);
            How::Lines {
                every: Duration::from_secs_f64(every.max(0.0)),
                last: None,
                started: Instant::now(),
                first_step: None,
            }
        };
        Progress {
            label: label.to_string(),
            how,
        }
    }

    /// A boxed one, for the lab's runs.
    pub fn boxed(label: &str) -> Box<dyn Observer> {
        Box::new(Self::new(label))
    }

    fn say(&self, what: &str) {
        if let How::Lines { .. } = self.how {
            eprintln!("{} {what}", self.label);
        }
    }
}

impl Observer for Progress {
    fn on_start(&mut self, start: usize, total: usize) {
        if let How::Bar(bar) = &mut self.how {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} {bar:30} {pos}/{len} steps {per_sec} {msg} (eta {eta})",
                )
                .expect("template"),
            );
            b.set_prefix(self.label.clone());
            b.set_position(start as u64);
            *bar = Some(b);
        }
    }

    fn on_step(&mut self, m: &StepMetrics) -> Result<()> {
        let label = &self.label;
        match &mut self.how {
            How::Off => {}
            How::Bar(bar) => {
                if let Some(b) = bar {
                    b.set_position(m.step as u64);
                    b.set_message(format!("loss {:.4} lr {:.2e}", m.loss, m.lr));
                }
            }
            How::Lines {
                every,
                last,
                started,
                first_step,
            } => {
                let first = *first_step.get_or_insert(m.step.saturating_sub(1));
                let due = last.is_none_or(|t| t.elapsed() >= *every) || m.step == m.total;
                if due {
                    *last = Some(Instant::now());
                    let done = m.step.saturating_sub(first).max(1) as f64;
                    let per = started.elapsed().as_secs_f64() / done;
                    let eta = per * m.total.saturating_sub(m.step) as f64;
                    eprintln!(
                        "{label} step {}/{} loss {:.4} lr {:.2e} ETA {}",
                        m.step,
                        m.total,
                        m.loss,
                        m.lr,
                        if eta >= 60.0 {
                            format!("{:.0} min", eta / 60.0)
                        } else {
                            format!("{eta:.0} s")
                        }
                    );
                }
            }
        }
        Ok(())
    }

    fn on_end(&mut self, step: usize, finished: bool) {
        if let How::Bar(Some(b)) = &self.how {
            if finished {
                b.finish_and_clear();
            } else {
                b.abandon_with_message(format!("stopped at step {step}"));
            }
        }
    }

    fn on_evaluating(&mut self, sets: usize, images: usize) {
        self.say(&format!(
            "evaluating {sets} set(s) on {images} validation image(s)"
        ));
    }
}
