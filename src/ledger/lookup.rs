//! Outcome reports on serves the ledger no longer keeps in memory (`recent`) read their audit
//! rows here, batched like the group commit: one query at a time, and every lookup queued
//! while it runs joins the next one (up to `MAX_LOOKUPS`). One read per report on the admin
//! pool's connection held reports on older serves to a few thousand a second; a batch costs
//! about one read.
//!
//! Guarantee: each lookup gets the row as the database held it when its batch was read (or
//! that batch's error); nothing is cached here.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use crate::model::UsageEvent;
use crate::store::{Db, StoreError};

/// Serve ids read in one query at most.
pub const MAX_LOOKUPS: usize = 512;

type Answer = Result<Option<UsageEvent>, StoreError>;

struct Lookup {
    id: String,
    answer: oneshot::Sender<Answer>,
}

/// Handle to the lookup task.
pub struct ServeLookups {
    queue: mpsc::UnboundedSender<Lookup>,
}

impl ServeLookups {
    /// Starts the lookup task on the current runtime; it ends when the handle is dropped.
    pub fn start(db: Db) -> ServeLookups {
        let (queue, inbox) = mpsc::unbounded_channel();
        tokio::spawn(run(db, inbox));
        ServeLookups { queue }
    }

    /// The serve's audit row, `None` if there is none.
    pub async fn find(&self, id: &str) -> Answer {
        let (answer, rx) = oneshot::channel();
        let lookup = Lookup {
            id: id.to_owned(),
            answer,
        };
        if self.queue.send(lookup).is_err() {
            return Err(StoreError::Unavailable("shutting down".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("shutting down".into())))
    }
}

async fn run(db: Db, mut inbox: mpsc::UnboundedReceiver<Lookup>) {
    while let Some(first) = inbox.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_LOOKUPS {
            match inbox.try_recv() {
                Ok(lookup) => batch.push(lookup),
                Err(_) => break,
            }
        }
        let ids: Vec<String> = batch.iter().map(|l| l.id.clone()).collect();
        match db.read_serves(&ids).await {
            Ok(rows) => {
                let rows: HashMap<String, UsageEvent> =
                    rows.into_iter().map(|r| (r.id.clone(), r)).collect();
                for lookup in batch {
                    let found = rows.get(&lookup.id).cloned();
                    let _ = lookup.answer.send(Ok(found));
                }
            }
            Err(e) => {
                for lookup in batch {
                    let _ = lookup.answer.send(Err(e.duplicate()));
                }
            }
        }
    }
}
