//! Group commit for inventory writes: writers that arrive while a commit
//! is being made to disk share the next commit and its one sync, and each
//! is answered only once that commit is durable.
//!
//! The contract of [`Committer::run`]: the operation runs under the
//! inventory's write lock, in arrival order after every operation queued
//! before it; its result is handed back only after the group it ran in is
//! committed and synced (an operation that failed its own checks changed
//! nothing and gets its own error; if the group's commit fails, every
//! operation in it gets [`InvError::NotDurable`] and memory is reloaded
//! from HEAD). Readers never see a change before it is durable, because
//! the write lock is held from the group's first operation to its sync.
//!
//! The order of work (leader/follower, no thread of its own): a writer
//! queues its operation; if no group is being made it becomes the leader,
//! takes every queued operation, runs them one by one against memory
//! ([`Inventory::begin_group`]), commits once ([`Inventory::commit_group`]),
//! answers them all, and hands leadership to the first writer that queued
//! meanwhile, whose operations become the next group. A writer blocks its
//! thread while it waits: async callers run it in `spawn_blocking`.

use std::sync::mpsc;
use std::sync::{Mutex, RwLock};

use super::{fresh_write, InvError, Inventory};

/// What a waiting writer is told: its answer, or that it leads the next
/// group.
enum Msg<T> {
    Done(T),
    Lead,
}

/// A queued operation: runs against memory and returns what answers the
/// writer once the group's commit has (or has not) reached the disk.
type Job = Box<dyn FnOnce(&mut Inventory) -> Answer + Send>;
type Answer = Box<dyn FnOnce(Result<(), String>) + Send>;
type Wake = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: Vec<(Job, Wake)>,
    /// A leader is making a group (it will hand over or clear this).
    leading: bool,
}

/// The group committer of one inventory.
#[derive(Default)]
pub struct Committer {
    queue: Mutex<Queue>,
}

/// Hands leadership on (or clears it) even when an operation panicked,
/// so later writers are never left waiting for a leader that is gone.
struct HandOver<'a>(&'a Committer);

impl Drop for HandOver<'_> {
    fn drop(&mut self) {
        let mut q = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.jobs.is_empty() {
            q.leading = false;
        } else {
            // The first queued writer leads the next group; its job stays
            // queued and is taken with the rest.
            let wake = std::mem::replace(&mut q.jobs[0].1, Box::new(|| {}));
            drop(q);
            wake();
        }
    }
}

impl Committer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `op` on the inventory in `lock` as part of a group commit and
    /// returns its result once its change is durable (see the module doc).
    pub fn run<T, E>(
        &self,
        lock: &RwLock<Inventory>,
        op: impl FnOnce(&mut Inventory) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<InvError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Msg<Result<T, E>>>();
        let wake_tx = tx.clone();
        let job: Job = Box::new(move |inv: &mut Inventory| {
            let r = op(inv);
            Box::new(move |durable: Result<(), String>| {
                let r = match (r, durable) {
                    (Err(e), _) => Err(e),
                    (Ok(v), Ok(())) => Ok(v),
                    (Ok(_), Err(e)) => Err(InvError::NotDurable(e).into()),
                };
                let _ = tx.send(Msg::Done(r));
            })
        });
        let wake: Wake = Box::new(move || {
            let _ = wake_tx.send(Msg::Lead);
        });
        let lead = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.jobs.push((job, wake));
            !std::mem::replace(&mut q.leading, true)
        };
        if lead {
            self.lead(lock);
        }
        loop {
            match rx.recv() {
                Ok(Msg::Done(r)) => return r,
                Ok(Msg::Lead) => self.lead(lock),
                Err(_) => return Err(InvError::NotDurable(
                    "the writer committing this group failed; nothing of it was answered as stored"
                        .into(),
                )
                .into()),
            }
        }
    }

    /// Makes one group of everything queued now, then hands over.
    fn lead(&self, lock: &RwLock<Inventory>) {
        let _hand_over = HandOver(self);
        let jobs = std::mem::take(&mut self.queue.lock().unwrap_or_else(|e| e.into_inner()).jobs);
        let mut inv = fresh_write(lock);
        inv.begin_group();
        let answers: Vec<Answer> = jobs.into_iter().map(|(job, _)| job(&mut inv)).collect();
        let durable = inv.commit_group().map(|_| ()).map_err(|e| e.to_string());
        drop(inv);
        for answer in answers {
            answer(durable.clone());
        }
    }
}
