// The website's own code, as a user writes it: the three lines from the README ("From a
// website"), bundled with esbuild by website.mjs. `window.siteOptions` only lets the test pick
// the write key, Switchyard's address and the delivery strategy.
import { AnalyticsBrowser } from '@segment/analytics-next';

const { writeKey, cdnURL, loadOptions } = window.siteOptions;
window.analytics = AnalyticsBrowser.load({ writeKey, cdnURL }, loadOptions);
