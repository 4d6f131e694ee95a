"""The video and image pipeline: resumable uploads, transcoding workers, HLS playback via the edge."""
