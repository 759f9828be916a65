#!/usr/bin/env bash
# Mutation check of the suite: breaks one guarantee at a
# time on purpose, runs the tests meant to prove it, and reports whether they
# noticed (they must fail). The source is restored after each mutation.
#
#   scripts/mutants.sh            every mutation
#   scripts/mutants.sh M1 R3      the named ones
#
# Needs the services of scripts/dev.sh (it starts them). Prints one line per
# mutation: its id, what it breaks, and CAUGHT (the tests failed) or MISSED.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/dev.sh up >/dev/null
eval "$(scripts/dev.sh env)"

# id ~ file ~ text to find ~ replacement (\n for a newline) ~ test target ~ test filter ~ what it breaks
MUTATIONS=$(cat <<'EOF'
M1~framework/src/store/append.rs~.bind(expected_head)~.bind(None::<uuid::Uuid>)~store~lost_commit~an append from a cached state checks only the sequence, not the head event
M2~framework/src/store/cache.rs~Arc::new(state.clone())~Arc::new(serde_json::from_value::<A>(serde_json::to_value(state).unwrap()).unwrap())~store~serde_copy~the cache keeps a serde round trip of the aggregate
M3~framework/src/store/mod.rs~        if from_cache\n~        if false && from_cache\n~store~stale_cache~a refusal or a no-op from the cache is trusted
M4~framework/src/store/append.rs~Some("40001" | "40P01")~Some("none")~store~serialization_failures~serialization failures are not conflicts
M5~framework/src/store/mod.rs~Ok(level != "read committed")~Ok(false)~store~fixed_snapshot~execute_in retries inside a fixed snapshot
M6~framework/src/store/mod.rs~if !conn.is_in_transaction() {~if false && !conn.is_in_transaction() {~store~without_a_transaction~execute_in runs without a transaction
M7~framework/src/store/append.rs~    validate_aggregate_id(aggregate_type, aggregate_id)?;\n~~store~aggregate_ids~empty and oversized aggregate ids are accepted
M8~framework/src/store/append.rs~           WHERE aggregate_type = $1 AND aggregate_id = $2) = $15\n~           WHERE aggregate_type = $1 AND aggregate_id = $2) >= 0\n~store~stream_end~the append skips the sequence check (gaps)
R1~framework/src/relay/settle.rs~WHERE o.id = d.id AND o.event_id = d.event_id~WHERE o.id = d.id~relay_faults~reuses_a_published_id~deletes name a row by id only
R2~framework/src/relay/settle.rs~                None if !behind => {~                _ if !behind => {~relay_faults~frozen~rows are deleted whatever their delivery report says
R3~framework/src/relay/publish.rs~            permanent,\n            held: false,~            permanent: false,\n            held: false,~relay_faults~refused_for_good~rows refused for good are retried forever
R4~framework/src/relay/lanes.rs~    ELSE hashtext('tidings.lanes.' || current_schema()) END~    ELSE $1 END~relay_faults~two_installations~lane locks ignore the schema
R5~framework/src/relay/mod.rs~                && last_progress.elapsed() >= self.config.stall_timeout~                && last_progress.elapsed() >= Duration::MAX~relay_faults~cannot_reach_the_broker~a stalled relay keeps its lanes
R6~framework/src/relay/mod.rs~        match tokio::time::timeout(settle_for, work).await {~        match Ok::<_, ()>(work.await) {~relay_faults~shutdown_finishes~shutdown waits for a silent database or broker
P1~framework/src/projection/apply.rs~                    match std::panic::catch_unwind(decoding) {~                    match Ok::<_, Box<dyn std::any::Any + Send>>(decoding()) {~projection_faults~panic_while_decoding~a panic while decoding is not caught
P2~framework/src/projection/runner.rs~match consumer.seek(topic, *partition, offset, Duration::from_secs(10)) {~match Ok::<(), rdkafka::error::KafkaError>(()) {~projection_faults~group_offset_ahead~partitions start at the group's Kafka offset, not the PostgreSQL checkpoint
P3~framework/src/projection/runner.rs~            instance.simple()\n        )~            ""\n        )~projection_faults~two_databases~the group id leaves out the database's registration
P4~framework/src/projection/apply.rs~    if text.len() <= MAX_IDENTITY_BYTES {~    if true {~projection_faults~too_long~identities too long for an index are kept as they are
P5~framework/src/projection/apply.rs~    if !blocked.is_empty() {\n        // BEGIN_BATCH's snapshot~    if false && !blocked.is_empty() {\n        // BEGIN_BATCH's snapshot~projection_faults~redrive_committed~the parked check trusts the snapshot taken before the lock waits
P6~framework/src/projection/runner.rs~client.set("partition.assignment.strategy", "cooperative-sticky");~client.set("partition.assignment.strategy", "range,roundrobin");~projection_faults~joining~rebalances stop every partition (eager protocol)
P7~framework/src/projection/setup.rs~SELECT pg_advisory_xact_lock(hashtextextended('tidings.setup.' || $1, 0))~SELECT $1::text~projection_faults~instances_starting~read-model set-up is not serialised
P8~framework/src/projection/runner.rs~                Ok((_, high)) if next > high => {~                Ok((_, high)) if false && next > high => {~projection_faults~beyond~a checkpoint beyond the partition's end is read past (new messages dropped as applied)
P9~framework/src/projection/runner.rs~        if self.last.is_some_and(|t| t.elapsed() < self.interval) {~        if false && self.last.is_some_and(|t| t.elapsed() < self.interval) {~logs~bounded~an outage logs a line per consumer error
P10~framework/src/projection/runner.rs~                    careful = true;~                    careful = false;~projection_faults~linear~every refusal restarts the whole batch (quadratic)
G1~framework/src/projection/apply.rs~        if sequence <= last {~        if false && sequence <= last {~faults~relay_killed~the projection skips the sequence check (redelivered events applied again)
G3~framework/src/projection/apply.rs~    SELECT $1, $2, $3, 0 FROM g WHERE g.generation = $4 \~    SELECT $1, $2, $3, 0 FROM g WHERE g.generation > 0 OR $4 = 0 \~dead_letters~replaced_generation~the fence is dropped: a runner on a replaced generation goes on applying
G4~framework/src/projection/apply.rs~        sequences.push(last_sequence[stream]);~        sequences.push(0);~faults~relay_killed~events are applied without saving their stream's position
P11~framework/src/projection/dead_letters.rs~                Err(e) if permanent(&e) => refused.push((id, e.to_string())),~                Err(e) if false && permanent(&e) => refused.push((id, e.to_string())),~dead_letters~refuses_for_good~a dead letter the topic refuses for good is retried forever
P12~framework/src/projection/switch.rs~(status.lag() > switch.max_lag)~(status.lag() > 0)~projection_switch~steady_load~the switch waits for a lag of exactly 0
P13~framework/src/projection/switch.rs~    if dead_lettered > 0 && !switch.allow_dead_letters {~    if false && dead_lettered > 0 && !switch.allow_dead_letters {~projection_switch~dead_letters~the switch ignores the new version's dead letters
P14~framework/src/projection/runner.rs~                config.batch_timeout,~                Duration::from_secs(3600),~projection_faults~goes_silent~a batch waits on a silent database for as long as TCP does
P15~framework/src/projection/runner.rs~        if permanent || self.streak_since.is_some_and(|t| now - t > allowance) {~        if false {~metrics~runner_cannot_reach~a runner whose consumer keeps failing reports itself ready
EOF
)

wanted=("$@")
printf '%s\n' "$MUTATIONS" | while IFS='~' read -r id file find replace target filter what; do
    if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " == *" $id "* ]]; then continue; fi
    cp "$file" "$file.orig"
    if ! python3 - "$file" "$find" "$replace" <<'PY'
import sys
path, find, replace = sys.argv[1:4]
find = find.replace("\\n", "\n")
replace = replace.replace("\\n", "\n")
text = open(path).read()
if find not in text:
    sys.exit(1)
open(path, "w").write(text.replace(find, replace, 1))
PY
    then
        echo "$id SKIPPED (text not found in $file): $what"
        rm -f "$file.orig"
        continue
    fi
    if cargo test --locked -q -p tidings-tests --test "$target" -- "$filter" </dev/null >"/tmp/mutant-$id.log" 2>&1; then
        verdict="MISSED"
    elif grep -q "could not compile" "/tmp/mutant-$id.log"; then
        verdict="DOES-NOT-COMPILE"
    else
        verdict="CAUGHT"
    fi
    mv "$file.orig" "$file"
    touch "$file" # a restored mtime would look older than the mutant's build
    echo "$id $verdict ($target::$filter): $what"
done
