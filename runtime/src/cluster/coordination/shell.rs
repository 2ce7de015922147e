//! The node loop's side of a coordination service: it owns the [`Session`] and the
//! [`Coordinated`] core, carries out the core's campaigns and publications off the loop, and
//! joins again as a new incarnation when the session ends. The loop awaits
//! [`ServicePlane::next`] beside its other inputs and hands what comes to
//! [`ServicePlane::handle`], which returns the membership commands to carry out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_actors::clock;
use tokio::sync::mpsc;

use super::super::membership::{MembershipCommand, View};
use super::super::registry::{store_key, JobEntry, StoreWrite, Version, MAX_STORED, RECORD_DIRS, STORE_DIR};
use super::core::{Action, Coordinated};
use super::{Coordination, CoordinationError, Member, Observed, Session, Settings};

/// How many answers of the service (campaigns, writes, joins) may wait for the loop.
const RESULTS_QUEUE: usize = 16;
/// Pause before a request that failed (the service unreachable for a moment) is tried again.
const RETRY: Duration = Duration::from_millis(200);
/// How long an orderly stop waits to give the registration up.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Sleep until `at`; never, without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the service answered, off the loop.
#[derive(Debug)]
pub enum Answer {
    /// The session of a (re)join, or why there is none.
    Joined(Result<(Arc<Session>, mpsc::Receiver<Observed>), CoordinationError>, u64),
    /// A campaign's outcome, for the incarnation that asked.
    Campaigned(u64, Result<Option<u64>, CoordinationError>),
    /// The jobs the service keeps, read when the term of (incarnation, token) began (after the
    /// role was won: no earlier coordinator writes any more).
    Listed(u64, u64, Result<Vec<JobEntry>, CoordinationError>),
    /// A write of the job registry (by the incarnation that asked): whether the service holds it.
    Stored(u64, Version, Result<bool, CoordinationError>),
    /// A fenced write of a view (by the incarnation that asked, with its token).
    Published(u64, View, u64, Result<bool, CoordinationError>),
}

/// One input for [`ServicePlane::handle`].
#[derive(Debug)]
pub enum Input {
    /// The service reported a change.
    Observed(Observed),
    /// A request finished.
    Answer(Answer),
    /// A lease has passed since this node first joined: the cluster had time to register.
    Settled,
}

/// A node's membership on a coordination service.
pub struct ServicePlane {
    spec: Coordination,
    settings: Settings,
    me: u32,
    addr: String,
    core: Coordinated,
    session: Option<Arc<Session>>,
    observed: Option<mpsc::Receiver<Observed>>,
    answers_tx: mpsc::Sender<Answer>,
    answers: mpsc::Receiver<Answer>,
    /// The first join's refusal (a second process with this id) stops the node.
    first_join: bool,
    /// This node's current coordination term: its token, and when it began (its lease counts
    /// from there).
    term: Option<(u64, Instant)>,
    /// When this node may campaign (a lease after it first joined), until it did settle.
    settle_at: Option<tokio::time::Instant>,
    /// The jobs the service kept when this node's term began, for the registry to take over.
    stored_jobs: Option<Vec<JobEntry>>,
    /// Ends of registry writes, for the registry: (version, the service holds it).
    stored: Vec<(Version, bool)>,
}

impl ServicePlane {
    /// Start joining `spec` as node `me` listening at `addr`.
    pub fn start(spec: Coordination, settings: Settings, me: u32, addr: String) -> Self {
        let (answers_tx, answers) = mpsc::channel(RESULTS_QUEUE);
        let incarnation = rand::random();
        let plane = Self {
            spec,
            settings,
            me,
            addr,
            core: Coordinated::new(me, incarnation),
            session: None,
            observed: None,
            answers_tx,
            answers,
            first_join: true,
            term: None,
            settle_at: None,
            stored_jobs: None,
            stored: Vec::new(),
        };
        plane.join(None, incarnation);
        plane
    }

    fn join(&self, previous: Option<Arc<Session>>, incarnation: u64) {
        let (spec, settings, tx) = (self.spec.clone(), self.settings.clone(), self.answers_tx.clone());
        let member = Member { id: self.me, incarnation, addr: self.addr.clone() };
        tokio::spawn(async move {
            // Give the old registration up first where the service still answers, so the new
            // one need not wait for it to run out.
            if let Some(old) = previous {
                let _ = tokio::time::timeout(LEAVE_TIMEOUT, old.leave()).await;
            }
            let joined = Session::join(&spec, member, settings).await.map(|(s, rx)| (Arc::new(s), rx));
            let _ = tx.send(Answer::Joined(joined, incarnation)).await;
        });
    }

    /// The service, as the node logs it.
    pub fn service(&self) -> String {
        self.session.as_ref().map_or_else(|| self.spec.to_string(), |s| s.service())
    }

    /// The adopted view.
    pub fn view(&self) -> Option<&View> {
        self.core.view()
    }

    /// The next input; pending while there is none.
    pub async fn next(&mut self) -> Input {
        loop {
            // Past the moment its lease or session surely held until, the node stops as if the
            // service had said it expired: cut off from the service, it may never hear that.
            let lapse = match (&self.session, &self.observed) {
                (Some(session), Some(_)) => {
                    Some(session.valid_until().map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std))
                }
                _ => None,
            };
            tokio::select! {
                biased;
                () = sleep_until(self.settle_at) => {
                    self.settle_at = None;
                    return Input::Settled;
                }
                () = sleep_until(lapse) => {
                    let holds = self.session.as_ref().and_then(|s| s.valid_until()).is_some_and(|u| clock::now() < u);
                    if !holds {
                        let reason = "not renewed before it could have run out at the service".to_string();
                        return Input::Observed(Observed::Expired { reason });
                    }
                    // Renewed meanwhile: wait for the new moment.
                }
                input = Self::next_of(&mut self.observed, &mut self.answers) => return input,
            }
        }
    }

    async fn next_of(observed: &mut Option<mpsc::Receiver<Observed>>, answers: &mut mpsc::Receiver<Answer>) -> Input {
        match observed {
            Some(observed) => tokio::select! {
                Some(event) = observed.recv() => Input::Observed(event),
                Some(answer) = answers.recv() => Input::Answer(answer),
            },
            None => match answers.recv().await {
                Some(answer) => Input::Answer(answer),
                None => std::future::pending().await,
            },
        }
    }

    /// Apply one input; the membership commands for the loop, or the error that must stop the
    /// node (another live process has its id).
    pub fn handle(&mut self, input: Input) -> Result<Vec<MembershipCommand>, CoordinationError> {
        let actions = match input {
            Input::Observed(event) => {
                if let Observed::Expired { reason } = &event {
                    tracing::warn!(node = self.me, service = %self.service(), %reason, "coordination session ended: stopping, joining again");
                }
                let expired = matches!(event, Observed::Expired { .. });
                let actions = self.core.on_observed(event);
                if expired {
                    self.observed = None;
                    let previous = self.session.take();
                    let incarnation = rand::random();
                    self.core.rejoined(incarnation);
                    self.join(previous, incarnation);
                }
                actions
            }
            Input::Answer(Answer::Joined(Ok((session, observed)), incarnation)) => {
                tracing::info!(node = self.me, service = %session.service(), incarnation, "joined the coordination service");
                if !self.core.settled() {
                    self.settle_at = Some(tokio::time::Instant::now() + self.settings.ttl);
                }
                self.first_join = false;
                self.session = Some(session);
                self.observed = Some(observed);
                Vec::new()
            }
            Input::Answer(Answer::Joined(Err(e), incarnation)) => {
                if self.first_join && matches!(e, CoordinationError::DuplicateMember { .. }) {
                    return Err(e);
                }
                tracing::warn!(node = self.me, error = %e, "cannot join the coordination service; trying again");
                let tx = self.answers_tx.clone();
                let (spec, settings, member) = (
                    self.spec.clone(),
                    self.settings.clone(),
                    Member { id: self.me, incarnation, addr: self.addr.clone() },
                );
                tokio::spawn(async move {
                    tokio::time::sleep(RETRY).await;
                    let joined = Session::join(&spec, member, settings).await.map(|(s, rx)| (Arc::new(s), rx));
                    let _ = tx.send(Answer::Joined(joined, incarnation)).await;
                });
                Vec::new()
            }
            Input::Settled => self.core.on_settled(),
            // A registry write ended: the registry hears (an earlier incarnation's write is not
            // this term's, as far as it can tell).
            Input::Answer(Answer::Stored(asked, version, result)) => {
                let held = match result {
                    Ok(held) => held && asked == self.core.incarnation(),
                    Err(e) => {
                        tracing::warn!(node = self.me, error = %e, "writing the job registry failed; trying again");
                        false
                    }
                };
                self.stored.push((version, held));
                Vec::new()
            }
            // An answer to an earlier incarnation's request: that session and its role are gone.
            Input::Answer(Answer::Campaigned(asked, ..) | Answer::Published(asked, ..) | Answer::Listed(asked, ..))
                if asked != self.core.incarnation() =>
            {
                Vec::new()
            }
            // The term's listing: for the registry, if the term is still this one.
            Input::Answer(Answer::Listed(_, token, listed)) => {
                match listed {
                    Ok(jobs) if self.core.token() == Some(token) => self.stored_jobs = Some(jobs),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(node = self.me, error = %e, "reading the job registry failed; trying again");
                        if self.core.token() == Some(token) {
                            self.spawn_list(token, RETRY);
                        }
                    }
                }
                Vec::new()
            }
            Input::Answer(Answer::Campaigned(_, Ok(token))) => self.core.on_campaigned(token),
            Input::Answer(Answer::Campaigned(_, Err(e))) => {
                tracing::warn!(node = self.me, error = %e, "campaign failed; trying again");
                self.spawn_campaign(RETRY);
                Vec::new()
            }
            Input::Answer(Answer::Published(_, view, _, Ok(written))) => self.core.on_published(view.epoch, written),
            Input::Answer(Answer::Published(_, view, token, Err(e))) => {
                // The write may or may not have landed: write the same view again (the same
                // bits twice are one view to every observer) while the role is this node's;
                // else the write is over, unwritten as far as this node can tell.
                tracing::warn!(node = self.me, epoch = view.epoch, error = %e, "publishing the view failed");
                if self.core.token() == Some(token) {
                    self.spawn_publish(token, view, RETRY);
                    Vec::new()
                } else {
                    self.core.on_published(view.epoch, false)
                }
            }
        };
        let mut commands = Vec::new();
        for action in actions {
            match action {
                Action::Membership(command) => commands.push(command),
                Action::Campaign => self.spawn_campaign(Duration::ZERO),
                Action::Publish { token, view } => self.spawn_publish(token, view, Duration::ZERO),
            }
        }
        // A term is a token: its lease counts from the moment this node knew it holds the role.
        match (self.core.token(), self.term) {
            (Some(token), Some((held, _))) if held == token => {}
            (Some(token), _) => {
                self.term = Some((token, clock::now()));
                self.stored_jobs = None;
                // However the role came (the campaign's answer or the watch, whichever was
                // first), the term begins by reading what the service keeps of the registry.
                self.spawn_list(token, Duration::ZERO);
            }
            (None, Some(_)) => {
                self.term = None;
                self.stored_jobs = None;
            }
            (None, None) => {}
        }
        Ok(commands)
    }

    fn spawn_campaign(&self, after: Duration) {
        let Some(session) = self.session.clone() else { return };
        let (tx, asked) = (self.answers_tx.clone(), self.core.incarnation());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Answer::Campaigned(asked, session.campaign().await)).await;
        });
    }

    fn spawn_list(&self, token: u64, after: Duration) {
        let Some(session) = self.session.clone() else { return };
        let (tx, asked) = (self.answers_tx.clone(), self.core.incarnation());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Answer::Listed(asked, token, stored_jobs(&session).await)).await;
        });
    }

    /// The jobs the service kept when this node's term began (once: the registry takes them
    /// over, and until then accepts and starts nothing as coordinator).
    pub fn take_stored_jobs(&mut self) -> Option<Vec<JobEntry>> {
        self.stored_jobs.take()
    }

    /// Ends of registry writes since the last call: (version, whether the service holds it).
    pub fn take_stored(&mut self) -> Vec<(Version, bool)> {
        std::mem::take(&mut self.stored)
    }

    /// Write the registry's changes to the service, fenced by this node's role; the end comes
    /// through [`take_stored`](Self::take_stored). Without the role, it fails at once.
    pub fn store(&mut self, write: StoreWrite) {
        let (Some(session), Some(token)) = (self.session.clone(), self.core.token()) else {
            self.stored.push((write.version, false));
            return;
        };
        let (tx, asked) = (self.answers_tx.clone(), self.core.incarnation());
        tokio::spawn(async move {
            let version = write.version;
            let result = write_jobs(&session, token, write).await;
            let _ = tx.send(Answer::Stored(asked, version, result)).await;
        });
    }

    fn spawn_publish(&self, token: u64, view: View, after: Duration) {
        let Some(session) = self.session.clone() else { return };
        let (tx, asked) = (self.answers_tx.clone(), self.core.incarnation());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let written = session.publish_view(token, &view).await;
            let _ = tx.send(Answer::Published(asked, view, token, written)).await;
        });
    }

    /// The coordinator's lease for its aggregators: from the start of its term until the
    /// moment its lease or session surely holds (the service hands the role to another only
    /// after it ran out there, which is later).
    pub fn lease(&self) -> Option<(Instant, Instant)> {
        if !self.core.is_coordinator() {
            return None;
        }
        let until = self.session.as_ref()?.valid_until()?;
        Some((self.term?.1, until))
    }

    /// Give this node's registration (and the role, if it holds it) up, for an orderly stop;
    /// gives up after [`LEAVE_TIMEOUT`] (the lease or session then runs out by itself). Call it
    /// once nothing of this node commits any more.
    pub async fn leave(mut self) {
        let Some(session) = self.session.take() else { return };
        let service = session.service();
        match tokio::time::timeout(LEAVE_TIMEOUT, session.leave()).await {
            Ok(Ok(())) => tracing::info!(node = self.me, %service, "left the coordination service"),
            Ok(Err(e)) => tracing::warn!(node = self.me, error = %e, "leaving the coordination service failed"),
            Err(_) => {
                tracing::warn!(node = self.me, %service, "no answer to the leave; the registration runs out by itself")
            }
        }
    }

    /// The registered members, for a node's status and logs.
    pub fn registered(&self) -> Vec<u32> {
        self.core.registered().iter().copied().collect()
    }
}

/// The jobs kept on the service, each read as Phalanx wrote it; a value that is not one is
/// skipped with a warning naming its key (it cannot be a job this cluster accepted).
async fn stored_jobs(session: &Session) -> Result<Vec<JobEntry>, CoordinationError> {
    let listed = session.list(STORE_DIR, MAX_STORED).await?;
    let service = session.service();
    let mut jobs = Vec::with_capacity(listed.len());
    for (name, bytes) in listed {
        let key = format!("{STORE_DIR}/{name}");
        let entry = super::decode::<JobEntry>(&service, &key, &bytes).and_then(|entry| {
            if name.parse::<u64>().ok() == Some(entry.id) {
                Ok(entry)
            } else {
                Err(CoordinationError::BadValue {
                    service: service.clone(),
                    key: key.clone(),
                    reason: format!("holds job {}", entry.id),
                })
            }
        });
        match entry {
            Ok(entry) => jobs.push(entry),
            Err(e) => tracing::warn!(error = %e, "skipped a value in the job registry"),
        }
    }
    Ok(jobs)
}

/// Carry out one registry write — job entries, records, deletes — every one fenced
/// by `token`; `false` as soon as one is refused (the role is gone).
async fn write_jobs(session: &Session, token: u64, write: StoreWrite) -> Result<bool, CoordinationError> {
    for entry in &write.puts {
        let bytes = serde_json::to_vec(entry).expect("a job entry serialises");
        if !session.put_fenced(token, &store_key(entry.id), &bytes).await? {
            return Ok(false);
        }
    }
    for (id, record) in &write.records {
        if !session.put_fenced(token, &format!("{}/{id}", record.dir()), &record.to_json()).await? {
            return Ok(false);
        }
    }
    for id in &write.deletes {
        let keys = std::iter::once(store_key(*id)).chain(RECORD_DIRS.iter().map(|dir| format!("{dir}/{id}")));
        for key in keys {
            if !session.delete_fenced(token, &key).await? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}
