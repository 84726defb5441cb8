//! Raw mail and attachments larger than `store::VALUE_PIECE` are written in pieces (the row takes the first, the
//! rest is appended): the stored bytes must be exactly the bytes given, on PostgreSQL and SQLite.

use std::borrow::Cow;

use mailqueue_engine::{
    ingest::{Incoming, Outcome},
    store::{self, VALUE_PIECE, attachments::NewAttachment, messages::NewMessage},
};
use mailqueue_schema::entity::attachment;
use mailqueue_tests::{Kind, both_backends, engine, mail};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, TransactionTrait};

both_backends! {
    large_values_are_stored_whole => large_values_are_stored_whole;
}

/// `len` bytes covering every byte value (NUL and invalid UTF-8 included), different in every piece.
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add((i / 4093) as u8) ^ seed)
        .collect()
}

async fn large_values_are_stored_whole(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let raw = mail(
        "a@example.com",
        "help@contoso.com",
        "Owner",
        "owner-1@example.com",
        "hello",
    );
    let outcome = engine
        .ingest(Incoming {
            raw: &raw,
            address: "help@contoso.com",
            source_key: None,
        })
        .await
        .unwrap();
    let Outcome::Created { contact_id, .. } = outcome else {
        panic!("{outcome:?}");
    };

    // Two full pieces and a short one; exactly one piece; one byte more than a piece.
    let raws = [
        bytes(2 * VALUE_PIECE + 12_345, 1),
        bytes(VALUE_PIECE, 2),
        bytes(VALUE_PIECE + 1, 3),
    ];
    let datas = [
        bytes(VALUE_PIECE + 7, 4),
        bytes(100, 5),
        bytes(3 * VALUE_PIECE, 6),
    ];
    let txn = engine.db.begin().await.unwrap();
    let mut ids = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        let message = new_message(contact_id, i, raw);
        ids.push(store::messages::insert(&txn, message).await.unwrap());
    }
    // The same through the multi-row path, which ingest uses.
    let many: Vec<NewMessage<'_>> = raws
        .iter()
        .enumerate()
        .map(|(i, raw)| new_message(contact_id, 10 + i, raw))
        .collect();
    ids.extend(store::messages::insert_many(&txn, many).await.unwrap());
    // Large attachments between small ones keep their order.
    let files: Vec<NewAttachment<'_>> = datas
        .iter()
        .enumerate()
        .map(|(i, data)| NewAttachment {
            message_id: ids[0],
            filename: Some(format!("f{i}.bin")),
            content_type: "application/octet-stream".into(),
            content_id: None,
            inline: false,
            data: Cow::Borrowed(data),
        })
        .collect();
    store::attachments::insert_many(&txn, files).await.unwrap();
    txn.commit().await.unwrap();

    for (id, raw) in ids.iter().zip(raws.iter().chain(raws.iter())) {
        let stored = engine.raw_message(contact_id, *id).await.unwrap();
        assert_eq!(stored.len(), raw.len(), "message {id}");
        assert!(stored == *raw, "message {id}: the stored bytes differ");
    }
    let stored = attachment::Entity::find()
        .filter(attachment::Column::MessageId.eq(ids[0]))
        .order_by_asc(attachment::Column::Id)
        .all(&engine.db)
        .await
        .unwrap();
    assert_eq!(stored.len(), datas.len());
    for (i, (row, data)) in stored.iter().zip(&datas).enumerate() {
        assert_eq!(row.filename.as_deref(), Some(format!("f{i}.bin").as_str()));
        assert_eq!(row.size, data.len() as i64);
        assert!(row.data == *data, "attachment {i}: the stored bytes differ");
    }
}

fn new_message(contact_id: i64, i: usize, raw: &[u8]) -> NewMessage<'_> {
    NewMessage {
        contact_id,
        direction: "inbound",
        source_key: Some(format!("test:large:{i}")),
        mailbox: Some("help@contoso.com".into()),
        message_id: Some(format!("large-{i}@example.com")),
        in_reply_to: None,
        references: serde_json::json!([]),
        from_address: Some("a@example.com".into()),
        from_name: None,
        reply_to: None,
        to_addresses: serde_json::json!([]),
        cc_addresses: serde_json::json!([]),
        subject: Some("Large".into()),
        sent_at: None,
        headers: serde_json::json!([]),
        text_body: None,
        html_body: None,
        raw: Some(Cow::Borrowed(raw)),
        size: raw.len() as i64,
        created_by: None,
    }
}
