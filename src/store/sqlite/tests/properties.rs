//! A property: claims and settlements in any interleaving keep call order and lose nothing.

use super::*;

/// One step of a dispatcher's life, as the property below drives the store.
#[derive(Debug, Clone)]
enum Step {
    Ingest { call: u8, event: u8, sinks: u8 },
    Claim { sink: u8, limit: usize },
    Settle { pick: usize, outcome: u8 },
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        (0u8..4, 0u8..3, 1u8..4).prop_map(|(call, event, sinks)| Step::Ingest {
            call,
            event,
            sinks
        }),
        (0u8..2, 1usize..4).prop_map(|(sink, limit)| Step::Claim { sink, limit }),
        (any::<usize>(), 0u8..6).prop_map(|(pick, outcome)| Step::Settle { pick, outcome }),
    ]
}

/// What the property remembers of one (sink, event): handed out, and how it ended.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Fate {
    #[default]
    Open,
    Delivered,
    Dead,
}

type Fates = std::collections::HashMap<(&'static str, i64), Fate>;

/// Each sink's queue, as its dispatcher would own it.
type Queues = std::collections::HashMap<&'static str, Box<dyn SinkQueue>>;

fn queue_of<'q>(queues: &'q mut Queues, sink: &str) -> &'q mut Box<dyn SinkQueue> {
    queues.get_mut(sink).expect("a queue for every sink")
}

/// Claims for `sink` and checks what came out against what the property knows.
async fn claim_checked(
    queues: &mut Queues,
    sink: &'static str,
    limit: usize,
    events: &[(i64, String, Vec<&'static str>)],
    fates: &Fates,
    in_hand: &mut Vec<(&'static str, crate::event::Delivery)>,
) {
    let due = queue_of(queues, sink)
        .claim(limit, usize::MAX)
        .await
        .expect("claim");
    for d in due {
        let row = d.id.row;
        assert!(
            !in_hand.iter().any(|(s, h)| *s == sink && h.id.row == row),
            "event {row} handed out twice on {sink}"
        );
        assert_eq!(
            fates.get(&(sink, row)),
            Some(&Fate::Open),
            "event {row} on {sink} had ended"
        );
        let call = d.call_id.clone().expect("call");
        for (id, c, routed) in events {
            if *id < row && *c == call && routed.contains(&sink) {
                assert_ne!(
                    fates[&(sink, *id)],
                    Fate::Open,
                    "event {row} went out on {sink} before {id} of its call ended"
                );
            }
        }
        in_hand.push((sink, d));
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// Whatever the interleaving of claims and outcomes: nothing is handed out twice at
    /// once, a call's event goes out only after its earlier ones ended, every event ends
    /// up delivered or dead on every sink it was routed to, and the outbox says so.
    #[test]
    fn claims_and_settlements_in_any_order_keep_call_order_and_lose_nothing(
        steps in proptest::collection::vec(step(), 1..80)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = open(dir.path()).await;
            let names = ["a", "b"];
            let mut queues: Queues = names.iter().map(|n| (*n, store.queue(n))).collect();
            let db = Connection::open(dir.path().join("router.db")).expect("open");
            // (event id, call, sinks) in ingest order; fates per (sink, event id).
            let mut events: Vec<(i64, String, Vec<&'static str>)> = Vec::new();
            let mut fates = Fates::default();
            let mut in_hand: Vec<(&'static str, crate::event::Delivery)> = Vec::new();
            for step in steps {
                match step {
                    Step::Ingest { call, event, sinks: mask } => {
                        let name = ["call_started", "call_completed", "all_processing_completed"][usize::from(event)];
                        let routed: Vec<&str> = names.iter().enumerate()
                            .filter(|(i, _)| mask & (1 << i) != 0).map(|(_, n)| *n).collect();
                        let call = format!("c{call}");
                        let stored = store.ingest(self::event(&call, name), sinks(&routed)).await.expect("stored");
                        if let Ingested::Stored { .. } = stored {
                            let event_id: i64 = db
                                .query_row("SELECT id FROM events WHERE dedup_key = ?1", [format!("{call}:{name}")], |r| r.get(0))
                                .expect("stored event");
                            for sink in &routed {
                                fates.insert((sink, event_id), Fate::Open);
                            }
                            events.push((event_id, call, routed));
                        }
                    }
                    Step::Claim { sink, limit } => {
                        let sink = names[usize::from(sink)];
                        claim_checked(&mut queues, sink, limit, &events, &fates, &mut in_hand).await;
                    }
                    Step::Settle { pick, outcome } => {
                        if in_hand.is_empty() {
                            continue;
                        }
                        let (sink, d) = in_hand.remove(pick % in_hand.len());
                        let id = d.id;
                        let error = "no".to_owned();
                        let settlement = match outcome {
                            0 | 1 => Some(Settlement::Delivered { id }),
                            2 => Some(Settlement::Retry { id, at: now(), error }),
                            3 => Some(Settlement::Dead { id, error }),
                            // The sink is down: a pause that is already over.
                            4 => Some(Settlement::Postpone { id, at: now(), error }),
                            _ => None,
                        };
                        match settlement {
                            Some(s) => {
                                let fate = match s {
                                    Settlement::Delivered { .. } => Fate::Delivered,
                                    Settlement::Dead { .. } => Fate::Dead,
                                    _ => Fate::Open,
                                };
                                queue_of(&mut queues, sink).settle(vec![s], Vec::new()).await.expect("settled");
                                fates.insert((sink, id.row), fate);
                            }
                            None => queue_of(&mut queues, sink).release(vec![id]),
                        }
                    }
                }
            }
            // Drain: everything still open goes out and is delivered.
            for (sink, d) in in_hand.drain(..) {
                queue_of(&mut queues, sink).release(vec![d.id]);
            }
            for _ in 0..200 {
                if fates.values().all(|f| *f != Fate::Open) {
                    break;
                }
                for sink in names {
                    claim_checked(&mut queues, sink, 10, &events, &fates, &mut in_hand).await;
                }
                for (sink, d) in in_hand.drain(..) {
                    queue_of(&mut queues, sink).settle(vec![Settlement::Delivered { id: d.id }], Vec::new()).await.expect("settled");
                    fates.insert((sink, d.id.row), Fate::Delivered);
                }
            }
            let open: Vec<_> = fates.iter().filter(|(_, f)| **f == Fate::Open).collect();
            assert!(open.is_empty(), "never delivered: {open:?}");
            for ((sink, id), fate) in &fates {
                let status: String = db
                    .query_row("SELECT status FROM outbox WHERE sink = ?1 AND event_id = ?2", rusqlite::params![sink, id], |r| r.get(0))
                    .expect("outbox row");
                let expected = if *fate == Fate::Dead { "dead" } else { "delivered" };
                assert_eq!(status, expected, "event {id} on {sink}");
            }
            drop(queues);
            store.close().await;
        });
    }
}
