"""Data: the sources (Tiny ImageNet, class folders, TFRecord shards), the one preprocessing, the tf.data pipeline,
the data scan, the converter, the synthetic writer and the downloader."""
