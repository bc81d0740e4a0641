"""Data pipeline (see docs/data.md): sources -> webdataset shards (+ wids index, manifest) ->
latent cache -> readers (streaming for public pretraining, Poisson by index for private
fine-tuning). Submodules are imported where used, so `import dpldm.data` stays light:

    sources   load_source(name, split) -> (uint8 images, int64 labels, meta)
    shards    import_arrays(...), FolderWriter, iter_shard(...)       (restartable writing)
    latents   encode_shards(...), load_encoder(ckpt), ae_state_hash(state_dict)
    loaders   PrivateIndexedDataset, InMemoryDataset, PoissonBatchLoader, stream_loader
    manifest  open_shard_folder(dir, expected_ae_hash=None) -> ShardFolder
    inspect   inspect_folder(dir, grid=PNG)
    errors    DataError, SourceError, ShardError, AutoencoderMismatchError, OutputError
    labels    class_labels(names): the one class-folder label rule (import and evaluate)
    images    read_images(files, ImageOptions(mode, resize, center_crop)): modes, 16-bit, resizing
    outdir    check_output_folder(out, inputs): what --out may be; writing(path): OSError -> OutputError
    public    open_public_data(cfg, ...): the public set for pretraining, in memory or streamed from shards
"""
