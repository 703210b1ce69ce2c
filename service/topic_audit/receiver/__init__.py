"""The receiver: the Litestar application that checks a callback, asks the writer to record it, and answers Tencent."""
