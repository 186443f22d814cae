"""What crosses between kvcake's processes, torch-free: one module per channel, plain msgspec
structs and frozen dataclasses, bounded where a peer could send too much::

    client edge --generate--> Conductor --worker--> instance (kvcake engine, or another engine)
                <-generate---           <-conductor- (Register, Report, Outputs, PrefillDone)

    sampling   SamplingParams: how a request samples and stops, on every channel
    output     TokenOutput: the one output record, engine -> instance RPC -> client edge
    kv         KVRegion: where an instance's paged KV cache lives; the store keys of blocks
    conductor  what instances tell the Conductor (and Role)
    worker     what the Conductor asks an instance
    generate   GenerateRequest / GenerateChunk between the HTTP edge and its backend
    store      the store's channels: clients and nodes -> master, master -> a node's disk tier

Each module is public: import the channel you speak (``from kvcake.wire.worker import
Prefill``).
"""
