//! The contact lifecycle: claim, assign, heartbeat, release, transfer, close, re-open. Each change and its event
//! commit in one transaction.

use chrono::{DateTime, Utc};
use mailqueue_schema::entity::contact;
use sea_orm::DatabaseTransaction;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use crate::{
    engine::{Engine, QueueDirectory},
    error::{Error, Result},
    store::{
        self,
        contacts::ClaimFilter,
        events::{ContactEvent, NewEvent},
    },
};

/// A contact as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Contact {
    pub id: i64,
    pub queue: String,
    /// `queued`, `claimed` or `closed`.
    pub state: String,
    /// Lowest value is served first.
    pub priority: i32,
    pub language: String,
    /// The queue address the contact arrived on.
    pub arrived_on: String,
    pub customer_address: Option<String>,
    pub customer_name: Option<String>,
    pub subject: Option<String>,
    /// Since when the contact waits (its age for claim order).
    pub queued_at: DateTime<Utc>,
    pub claimed_by: Option<String>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Contact {
    pub fn from_model(m: contact::Model, dir: &QueueDirectory) -> Self {
        Self {
            id: m.id,
            queue: dir
                .by_id(m.queue_id)
                .map(|q| q.name.clone())
                .unwrap_or_else(|| format!("#{}", m.queue_id)),
            state: m.state,
            priority: m.priority,
            language: m.language,
            arrived_on: m.arrived_on,
            customer_address: m.customer_address,
            customer_name: m.customer_name,
            subject: m.subject,
            queued_at: m.queued_at,
            claimed_by: m.claimed_by,
            claimed_at: m.claimed_at,
            lease_expires_at: m.lease_expires_at,
            closed_at: m.closed_at,
            created_at: m.created_at,
            updated_at: m.updated_at,
        }
    }
}

/// Who acts on a contact. An agent may only act on contacts it holds; a supervisor (router, admin) on any.
#[derive(Debug, Clone, Copy)]
pub enum Actor<'a> {
    Agent(&'a str),
    Supervisor(&'a str),
}

impl<'a> Actor<'a> {
    pub fn name(&self) -> &'a str {
        match self {
            Self::Agent(n) | Self::Supervisor(n) => n,
        }
    }
    fn holder(&self) -> Option<&'a str> {
        match self {
            Self::Agent(n) => Some(n),
            Self::Supervisor(_) => None,
        }
    }
}

impl Engine {
    /// A contact by id.
    pub async fn contact(&self, id: i64) -> Result<Contact> {
        let m = store::contacts::get(&self.db, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        Ok(Contact::from_model(m, &*self.queues().await))
    }

    /// Claims the next contact for `agent` among `queue_ids` (lowest priority value, then oldest), optionally
    /// only in `languages`. `None` when nothing waits.
    pub async fn claim_next(
        &self,
        agent: &str,
        queue_ids: &[i64],
        languages: &[String],
    ) -> Result<Option<Contact>> {
        let lease = self.claim_lease().await;
        let filter = ClaimFilter {
            queue_ids,
            languages,
        };
        let event = ContactEvent {
            kind: "contact.claimed",
            actor: agent,
            data: json!({ "agent": agent }),
        };
        let Some(m) = store::contacts::claim_next(&self.db, &filter, agent, lease, &event).await?
        else {
            self.metrics().claim_found_nothing();
            return Ok(None);
        };
        self.events_appended();
        let contact = Contact::from_model(m, &*self.queues().await);
        self.metrics().claimed(&contact.queue, false);
        Ok(Some(contact))
    }

    /// Gives a waiting contact to `agent` (routing backend).
    pub async fn assign(&self, id: i64, router: &str, agent: &str) -> Result<Contact> {
        let lease = self.claim_lease().await;
        let txn = store::begin_write(&self.db).await?;
        match store::contacts::assign(&txn, id, agent, lease).await? {
            Some(m) => {
                let contact = self
                    .finish(
                        txn,
                        m,
                        "contact.assigned",
                        router,
                        json!({ "agent": agent }),
                    )
                    .await?;
                self.metrics().claimed(&contact.queue, true);
                Ok(contact)
            }
            None => Err(self.explain(txn, id, "is not waiting in a queue").await),
        }
    }

    /// Extends the claim lease of a contact `agent` holds.
    pub async fn heartbeat(&self, id: i64, agent: &str) -> Result<Contact> {
        let lease = self.claim_lease().await;
        match store::contacts::heartbeat(&self.db, id, agent, lease).await? {
            Some(m) => Ok(Contact::from_model(m, &*self.queues().await)),
            None => Err(self
                .explain_db(id, &format!("is not claimed by {agent}"))
                .await),
        }
    }

    /// Returns a claimed contact to its queue with its original age.
    pub async fn release(&self, id: i64, actor: Actor<'_>) -> Result<Contact> {
        let txn = store::begin_write(&self.db).await?;
        match store::contacts::release(&txn, id, actor.holder()).await? {
            Some(m) => {
                self.finish(txn, m, "contact.released", actor.name(), json!({}))
                    .await
            }
            None => Err(self.explain(txn, id, &held_by(actor)).await),
        }
    }

    /// Moves a contact to `queue`: it takes that queue's priority and language and waits there.
    pub async fn transfer(&self, id: i64, actor: Actor<'_>, queue: &str) -> Result<Contact> {
        let dir = self.queues().await;
        let target = dir
            .by_name
            .get(queue)
            .filter(|q| q.enabled)
            .ok_or_else(|| Error::Invalid(format!("there is no enabled queue named `{queue}`")))?;
        let txn = store::begin_write(&self.db).await?;
        let from = store::contacts::get(&txn, id).await?.map(|m| m.queue_id);
        let moved = store::contacts::transfer(
            &txn,
            id,
            actor.holder(),
            target.id,
            target.priority,
            &target.language,
        )
        .await?;
        match moved {
            Some(m) => {
                let from = from.and_then(|q| dir.by_id(q)).map(|q| q.name.clone());
                let data = json!({ "from": from, "to": queue });
                self.finish(txn, m, "contact.transferred", actor.name(), data)
                    .await
            }
            None => Err(self.explain(txn, id, &held_by(actor)).await),
        }
    }

    /// Closes an open contact.
    pub async fn close(&self, id: i64, actor: Actor<'_>) -> Result<Contact> {
        let event = ContactEvent {
            kind: "contact.closed",
            actor: actor.name(),
            data: json!({}),
        };
        match store::contacts::close(&self.db, id, actor.holder(), &event).await? {
            Some(m) => {
                self.events_appended();
                Ok(Contact::from_model(m, &*self.queues().await))
            }
            None => Err(self.explain_db(id, &held_by(actor)).await),
        }
    }

    /// Re-opens a closed contact: it waits in its queue again, from now.
    pub async fn reopen(&self, id: i64, actor: &str) -> Result<Contact> {
        let txn = store::begin_write(&self.db).await?;
        match store::contacts::reopen(&txn, id).await? {
            Some(m) => {
                self.finish(txn, m, "contact.reopened", actor, json!({}))
                    .await
            }
            None => Err(self.explain(txn, id, "is not closed").await),
        }
    }

    /// Appends the event for a changed contact, commits, and wakes event readers.
    async fn finish(
        &self,
        txn: DatabaseTransaction,
        m: contact::Model,
        kind: &str,
        actor: &str,
        data: serde_json::Value,
    ) -> Result<Contact> {
        let contact = Contact::from_model(m, &*self.queues().await);
        let event = NewEvent {
            kind,
            contact_id: Some(contact.id),
            queue: Some(&contact.queue),
            actor: Some(actor),
            data,
        };
        store::events::insert(&txn, event).await?;
        txn.commit().await?;
        self.events_appended();
        Ok(contact)
    }

    /// Why an update matched no row: the contact does not exist (404) or is in another state (409).
    async fn explain(&self, txn: DatabaseTransaction, id: i64, expected: &str) -> Error {
        let _ = txn.rollback().await;
        self.explain_db(id, expected).await
    }

    async fn explain_db(&self, id: i64, expected: &str) -> Error {
        match store::contacts::get(&self.db, id).await {
            Ok(Some(m)) => Error::conflict(format!(
                "contact {id} {expected}: it is {}{}",
                m.state,
                m.claimed_by.map(|a| format!(" by {a}")).unwrap_or_default()
            )),
            Ok(None) => not_found(id),
            Err(e) => e.into(),
        }
    }

    /// Returns contacts whose claim lease expired to their queues, each with a `contact.lease_expired` event.
    pub async fn rescue_expired(&self, now: DateTime<Utc>) -> Result<usize> {
        let mut rescued = 0;
        for m in store::contacts::expired(&self.db, now, 500).await? {
            let holder = m.claimed_by.clone().unwrap_or_default();
            let txn = store::begin_write(&self.db).await?;
            match store::contacts::rescue_one(&txn, m.id, &holder, now).await? {
                Some(m) => {
                    self.finish(
                        txn,
                        m,
                        "contact.lease_expired",
                        "rescuer",
                        json!({ "agent": holder }),
                    )
                    .await?;
                    rescued += 1;
                }
                None => txn.rollback().await?,
            }
        }
        Ok(rescued)
    }
}

fn not_found(id: i64) -> Error {
    Error::not_found(format!("there is no contact {id}"))
}

fn held_by(actor: Actor<'_>) -> String {
    match actor {
        Actor::Agent(a) => format!("is not claimed by {a}"),
        Actor::Supervisor(_) => "is not open".into(),
    }
}
